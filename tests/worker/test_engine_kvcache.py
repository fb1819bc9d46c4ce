"""The KV cache operations the serving loop relies on: row views that write
through, moving a row, clearing a row, and resizing in place."""

from __future__ import annotations

import pytest
import torch

from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.kvcache import KVCache


def filled_cache() -> KVCache:
    config = tiny_config()
    cache = KVCache(config, 3, 8, [0, 2])
    for layer in cache.layers:
        cache.keys[layer].copy_(torch.randn_like(cache.keys[layer]))
        cache.values[layer].copy_(torch.randn_like(cache.values[layer]))
    cache.lengths[:] = torch.tensor([5, 2, 7])
    cache.history_start[2] = torch.tensor([1, 0, 3])
    return cache


def test_a_row_view_writes_through() -> None:
    cache = filled_cache()
    view = cache.rows(1, 3)
    assert view.batch_size == 2 and view.lengths.tolist() == [2, 7]
    view.lengths += 1
    view.keys[0][0, :, 0] = 42.0
    assert cache.lengths.tolist() == [5, 3, 8]
    assert bool((cache.keys[0][1, :, 0] == 42.0).all())
    assert view.history_start[2].tolist() == [0, 3]
    with pytest.raises(ValueError, match="outside"):
        cache.rows(2, 4)


def test_move_and_clear_row() -> None:
    cache = filled_cache()
    expected = cache.keys[2][2, :, :7].clone()
    expected_values = cache.values[2][2, :, :7].clone()
    cache.move_row(2, 0)
    assert torch.equal(cache.keys[2][0, :, :7], expected)
    assert torch.equal(cache.values[2][0, :, :7], expected_values)
    assert cache.lengths[0] == 7 and cache.history_start[2][0] == 3
    cache.clear_row(2)
    assert cache.lengths[2] == 0 and cache.history_start[2][2] == 0


def test_resize_keeps_rows_and_tokens() -> None:
    cache = filled_cache()
    before = {layer: cache.keys[layer][:2, :, :5].clone() for layer in cache.layers}
    values = {layer: cache.values[layer][:2, :, :5].clone() for layer in cache.layers}
    cache.lengths[2] = 0
    cache.resize(2, 5)
    assert cache.batch_size == 2 and cache.capacity == 5
    assert cache.keys[0].shape == (2, 2, 5, 16)
    for layer in cache.layers:
        assert torch.equal(cache.keys[layer], before[layer])
        assert torch.equal(cache.values[layer], values[layer])
    assert cache.history_start[2].tolist() == [1, 0]
    cache.resize(4, 9)
    assert cache.lengths.tolist() == [5, 2, 0, 0]
    assert cache.reserved_bytes() == 2 * 2 * (4 * 2 * 9 * 16 * 4)
    with pytest.raises(ValueError, match="more than capacity 3"):
        cache.resize(4, 3)
