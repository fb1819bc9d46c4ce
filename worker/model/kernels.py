"""Which matmul kernel each projection runs, chosen per machine at load time.

The fastest way to multiply by a projection's weight at decode batch sizes
depends on the CPU, not on the code: measured on one 2-core machine with
AVX-512 and AMX, oneDNN's packed float32 layout decoded at 0.76x
transformers and the plain layout at 1.06x; elsewhere the packed one won
(1.25x). torch's weight-only int8 and int4 ops likewise win or lose against
dequantizing and multiplying depending on the dtype and the CPU's
instructions. So instead of a constant, `measure_kernels` times each
candidate on each projection shape and level the model has, at batch 1 (a
few milliseconds each), and the model builds every projection with the
winner. The choice changes which kernel runs, never how many bytes a
projection holds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elasticfleet.worker.model.plan import FULL, INT4, INT8, KEPT_LEVELS
from elasticfleet.worker.model.quant import DEQUANT, OP, QuantLinear, kernel_available

#: Full-precision projections: F.linear on the plain weight, or oneDNN's
#: packed layout.
PLAIN = "plain"
PACKED = "packed"

#: (level, out_features, in_features)
Shape = tuple[str, int, int]


def onednn_available() -> bool:
    """Whether this torch build can run oneDNN-packed linear layers."""
    available: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return available


def candidates(level: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    """The kernels a projection at `level` can run on `device`, default first."""
    if level == FULL:
        packable = device.type == "cpu" and onednn_available() and dtype != torch.float16
        return [PACKED, PLAIN] if packable else [PLAIN]
    return [OP, DEQUANT] if kernel_available(level, device) else [DEQUANT]


@dataclass
class KernelChoice:
    """The kernel for each (level, out, in) projection shape; shapes not
    measured take their level's first candidate (`fixed`: what a caller
    asked for, `measured`: the timings in microseconds that decided)."""

    dtype: torch.dtype
    device: torch.device
    chosen: dict[Shape, str] = field(default_factory=dict)
    measured: dict[Shape, dict[str, float]] = field(default_factory=dict)
    packed: bool | None = None

    def kernel(self, level: str, out_features: int, in_features: int) -> str:
        picked = self.chosen.get((level, out_features, in_features))
        if picked is not None:
            return picked
        options = candidates(level, self.dtype, self.device)
        if level == FULL and self.packed is not None:
            return PACKED if self.packed and PACKED in options else PLAIN
        return options[0]

    def describe(self) -> str:
        """One line per measured shape: the winner and every candidate's time."""
        lines = []
        for (level, out, inp), times in sorted(self.measured.items()):
            timing = ", ".join(f"{k} {us:.0f} us" for k, us in times.items())
            lines.append(f"{level} {out}x{inp}: {self.chosen[(level, out, inp)]} ({timing})")
        return "\n".join(lines)


def fixed_kernels(dtype: torch.dtype, device: torch.device, packed: bool) -> KernelChoice:
    """No measurement: full projections packed or plain as asked, quantized
    ones on torch's op where the device has it."""
    return KernelChoice(dtype, device, packed=packed)


def measure_kernels(
    shapes: Iterable[tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    levels: Iterable[str] = KEPT_LEVELS,
    repeats: int = 9,
    clock: Callable[[], float] = time.perf_counter,
) -> KernelChoice:
    """Time every candidate kernel of every (out, in) shape at each level on
    a batch-1 decode input (median of `repeats` after a warm-up) and choose
    the fastest."""
    choice = KernelChoice(dtype, device)
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in sorted(set(shapes)):
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        x = torch.randn(1, 1, in_features, generator=generator).to(dtype=dtype, device=device)
        for level in levels:
            options = candidates(level, dtype, device)
            times = {}
            for kernel in options:
                run = _projection(weight.to(device), level, dtype, kernel)
                run(x)
                samples = []
                for _ in range(repeats):
                    start = clock()
                    run(x)
                    samples.append((clock() - start) * 1e6)
                times[kernel] = statistics.median(samples)
            shape = (level, out_features, in_features)
            choice.measured[shape] = times
            choice.chosen[shape] = min(options, key=lambda k: times[k])
    return choice


def _projection(
    weight: torch.Tensor, level: str, dtype: torch.dtype, kernel: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that multiplies by `weight` at `level` with `kernel`."""
    if level in (INT8, INT4):
        return QuantLinear(weight, level, dtype, kernel)
    plain = weight.to(dtype)
    if kernel == PACKED:
        packed = torch.ops.mkldnn._reorder_linear_weight(plain, 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, plain)
