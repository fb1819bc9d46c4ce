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

A serving loop keeps its running sequences in the first rows and works on
views of them (`rows`), so a decode step reads the cache in place, never a
gathered copy. It moves a row when a sequence leaves (`move_row`), wipes a
row's bookkeeping before a new sequence takes it (`clear_row`) and grows or
shrinks the whole cache between steps (`resize`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.memory import kv_bytes_per_token


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

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) that shares this one's storage:
        writes through the view (keys, values and lengths) land here."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop} are outside 0..{self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.config = self.config
        view.batch_size = stop - start
        view.capacity = self.capacity
        view.dtype = self.dtype
        view.device = self.device
        view.lengths = self.lengths[start:stop]
        view.keys = {layer: t[start:stop] for layer, t in self.keys.items()}
        view.values = {layer: t[start:stop] for layer, t in self.values.items()}
        view.history_start = {layer: t[start:stop] for layer, t in self.history_start.items()}
        return view

    def clear_row(self, row: int) -> None:
        """Make `row` empty: length 0 and a full history in every layer."""
        self.lengths[row] = 0
        for start in self.history_start.values():
            start[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s tokens and bookkeeping into row `target`."""
        length = int(self.lengths[source])
        for layer in self.keys:
            self.keys[layer][target, :, :length] = self.keys[layer][source, :, :length]
            self.values[layer][target, :, :length] = self.values[layer][source, :, :length]
        self.lengths[target] = length
        for start in self.history_start.values():
            start[target] = start[source]

    def resize(self, batch_size: int, capacity: int) -> None:
        """Change the shape to [batch_size, capacity] in place, keeping the
        first rows and their tokens; every row kept must fit the new
        capacity. Layers are reallocated one at a time, so memory exceeds
        the larger of the two shapes by at most one layer's tensors."""
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(f"KV cache needs a positive shape, got {batch_size} x {capacity}")
        kept = min(batch_size, self.batch_size)
        longest = int(self.lengths[:kept].max())
        if longest > capacity:
            raise ValueError(f"a row holds {longest} positions, more than capacity {capacity}")
        span = min(capacity, self.capacity)
        self.batch_size, self.capacity = batch_size, capacity
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = torch.zeros(
                    (batch_size, old.shape[1], capacity, old.shape[3]),
                    dtype=self.dtype,
                    device=self.device,
                )
                new[:kept, :, :span] = old[:kept, :, :span]
                store[layer] = new
                del old
        lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        lengths[:kept] = self.lengths[:kept]
        self.lengths = lengths
        for layer, start in self.history_start.items():
            fresh = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            fresh[:kept] = start[:kept]
            self.history_start[layer] = fresh

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
