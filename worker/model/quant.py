"""Weight-only quantization of a block's projections: the int8 and int4
steps of a block's ladder (worker/model/plan.py).

A projection is always quantized from its full weights as read from the
safetensors file, never from an already quantized tensor, so every level is
one rounding away from the stored model and restoring full reads the exact
stored values back. The activations stay in the serving dtype; only the
weights are narrow, which is what makes small-batch decoding (bound by
reading the weights) faster and the block smaller.

- int8: symmetric, one scale per output channel: w ~ q * s, q in [-127, 127].
- int4: asymmetric, one scale and zero point per group of input features of
  each output channel (`int4_group_size`): w ~ (q - 8) * s + z, q in [0, 15],
  the convention of torch's int4 kernels.

Kernels: torch's weight-only `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` where the device has them, else (or where the
load-time measurement finds it faster, worker/model/kernels.py) the weights
are dequantized and multiplied in the serving dtype. The bytes held are the
same either way (`projection_bytes` in worker/model/memory.py counts them):
the int4 op wants its own blocked order of the 4-bit codes, the dequantizing
path a plain one (low nibble first), both two codes a byte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elasticfleet.worker.model.memory import int4_group_size
from elasticfleet.worker.model.plan import INT4, INT8

#: The kernels a quantized projection can run.
OP = "op"
DEQUANT = "dequant"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8, scales [N] float32) of a float weight [N, K]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int32 in 0..15, scale and zero [K/group, N, 2] float32)
    of a float weight [N, K], min-max per group."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((w - low) / scale).clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale  # so that w ~ (q - 8) * scale + zero
    scale_zero = torch.stack((scale[..., 0].T, zero[..., 0].T), dim=-1)  # [K/g, N, 2]
    return codes.reshape(out_features, in_features), scale_zero.contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 as bytes [N, K/2], low nibble first."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: codes [N, K] (int32)."""
    low = (packed & 0x0F).to(torch.int32)
    high = (packed >> 4).to(torch.int32)
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] an int8 projection stands for, in `dtype`."""
    return (codes.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(
    codes: torch.Tensor, scale_zero: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weight [N, K] of int4 codes [N, K] (0..15) and their scales and
    zero points [K/group, N, 2], in `dtype`."""
    out_features, in_features = codes.shape
    scale = scale_zero[..., 0].float().T[..., None]  # [N, K/g, 1]
    zero = scale_zero[..., 1].float().T[..., None]
    grouped = codes.float().reshape(out_features, in_features // group, group)
    return ((grouped - 8) * scale + zero).reshape(out_features, in_features).to(dtype)


def kernel_available(level: str, device: torch.device) -> bool:
    """Whether torch has a weight-only kernel for `level` on `device`
    (int4: only its CPU kernel is used; other devices dequantize)."""
    if level == INT8:
        return device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class QuantLinear(nn.Module):
    """A bias-free projection whose weight is held at int8 or int4.

    `weight` holds the codes and `scales` the scales (int8: [N]; int4: scale
    and zero point [K/group, N, 2]), both parameters so that the memory
    accountant counts them like any weight."""

    def __init__(
        self,
        weight: torch.Tensor,
        level: str,
        dtype: torch.dtype,
        kernel: str,
    ) -> None:
        super().__init__()
        if level not in (INT8, INT4) or kernel not in (OP, DEQUANT):
            raise ValueError(f"no quantized projection at level {level!r} with kernel {kernel!r}")
        self.out_features, self.in_features = weight.shape
        self.level = level
        self.dtype = dtype
        self.kernel = kernel
        self.group = 0
        if level == INT8:
            codes, scales = quantize_int8(weight)
            stored = codes
        else:
            self.group = int4_group_size(self.in_features)
            codes4, scales = quantize_int4(weight, self.group)
            if kernel == OP:
                stored = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4, 1)
            else:
                stored = pack_nibbles(codes4)
        self.weight = nn.Parameter(stored.to(weight.device), requires_grad=False)
        self.scales = nn.Parameter(scales.to(dtype).to(weight.device), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] this projection multiplies by, in its dtype
        (the reference the kernels are tested against)."""
        if self.level == INT8:
            return dequantize_int8(self.weight, self.scales, self.dtype)
        if self.kernel == OP:
            raise ValueError("the int4 op's blocked codes are not read back; use kernel='dequant'")
        codes = unpack_nibbles(self.weight)
        return dequantize_int4(codes, self.scales, self.group, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == DEQUANT:
            return F.linear(x, self.dequantized())
        flat = x.reshape(-1, self.in_features)  # the ops take 2-D inputs
        out: torch.Tensor
        if self.level == INT8:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.weight, self.group, self.scales
            )
        return out.reshape(*x.shape[:-1], self.out_features)
