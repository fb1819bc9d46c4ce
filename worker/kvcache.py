"""A preallocated KV cache that holds keys and values only for kept attention
blocks.

Rows are sequence slots. Each row stores its tokens at positions
0..length-1, so rows of different lengths share one tensor per layer and a
decode step writes every row at its own position. A dropped attention block
owns no cache tensor at all: that is where pruning attention saves memory.

An attention block restored while sequences are running has no keys or values
for the tokens those sequences already hold. Its cache starts at each row's
current length (`history_start`), and the block attends only to tokens from
there on; the other layers keep their full history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from elasticfleet.worker.config import ModelConfig
from elasticfleet.worker.memory import kv_bytes_per_token


class KVCache:
    """Keys and values of shape [batch, kv_heads, capacity, head_dim] per kept layer."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        layers: Iterable[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(
                "KV cache needs a positive batch size and capacity, "
                f"got {batch_size} and {capacity}"
            )
        self.config = config
        self.batch_size = batch_size
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.history_start: dict[int, torch.Tensor] = {}
        for layer in layers:
            self._allocate(layer)

    def _allocate(self, layer: int) -> None:
        shape = (
            self.batch_size,
            self.config.num_key_value_heads,
            self.capacity,
            self.config.head_dim,
        )
        self.keys[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def sync_layers(self, keep_attention: Sequence[bool]) -> None:
        """Free the cache of dropped attention blocks and allocate restored ones.

        A restored block's history begins at each row's current length."""
        for layer, keep in enumerate(keep_attention):
            if not keep and layer in self.keys:
                del self.keys[layer], self.values[layer]
                self.history_start.pop(layer, None)
            elif keep and layer not in self.keys:
                self._allocate(layer)
                if bool(self.lengths.any()):
                    self.history_start[layer] = self.lengths.clone()

    def update(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ([B, Hkv, T, D]) at `positions` ([B, T])
        and return the layer's cache truncated to the first kv_len positions."""
        rows = torch.arange(self.batch_size, device=self.device)[:, None]  # [B, 1]
        # Advanced indexing on dims 0 and 2 yields a [B, T, Hkv, D] target.
        self.keys[layer][rows, :, positions] = key.transpose(1, 2)
        self.values[layer][rows, :, positions] = value.transpose(1, 2)
        return self.keys[layer][:, :, :kv_len], self.values[layer][:, :, :kv_len]

    def reserved_bytes(self) -> int:
        """Bytes of cache storage allocated, whether filled or not."""
        return sum(
            t.untyped_storage().nbytes() for t in (*self.keys.values(), *self.values.values())
        )

    def used_bytes(self) -> int:
        """Bytes holding real tokens: each row's length (minus any history a
        restored layer lacks) times the per-token size, summed over layers."""
        per_token = kv_bytes_per_token(self.config, self.dtype)
        total = 0
        for layer in self.keys:
            start = self.history_start.get(layer)
            filled = self.lengths if start is None else self.lengths - start
            total += int(filled.clamp(min=0).sum()) * per_token
        return total
