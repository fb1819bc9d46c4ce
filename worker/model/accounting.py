"""The memory accountant: what the worker really holds, measured from live
tensors rather than predicted.

Every figure is a sum of tensor storage sizes, with storages shared by
several tensors (tied embeddings) counted once, so the report can be checked
against the memory model's prediction and against the allocator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from elasticfleet.worker.model.kvcache import KVCache
from elasticfleet.worker.model.llama import ElasticLlama


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by the worker, by kind."""

    weight_bytes: int
    kv_reserved_bytes: int
    kv_used_bytes: int
    adapter_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Everything allocated: weights, reserved KV and adapters."""
        return self.weight_bytes + self.kv_reserved_bytes + self.adapter_bytes


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`.

    A oneDNN-packed weight hides its storage; for the plain 2-D float
    weights we pack, its buffer holds exactly numel elements (the real-model
    test checks the total against the process's resident memory)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor.is_mkldnn:
            seen[("opaque", id(tensor))] = tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            seen[("storage", storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def account(
    model: ElasticLlama,
    cache: KVCache | None = None,
    adapters: Iterable[torch.Tensor] = (),
) -> MemoryReport:
    """Measure the model's weights, the cache's reserved and used KV bytes,
    and the adapter tensors held (loaded sets and the adapter cache, whose
    shared storages count once)."""
    return MemoryReport(
        weight_bytes=storage_bytes(model.parameters()),
        kv_reserved_bytes=0 if cache is None else cache.reserved_bytes(),
        kv_used_bytes=0 if cache is None else cache.used_bytes(),
        adapter_bytes=storage_bytes(adapters),
    )
