"""The paged KV cache's operations the serving loop relies on: assigning
and freeing blocks, row views that write through, reordering rows without
copying tokens, and growing or compacting the pool with every token kept."""

from __future__ import annotations

import pytest
import torch

from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.kvcache import SCRATCH_BLOCK, KVCache
from elasticfleet.worker.model.llama import ElasticLlama


def tokens_of(cache: KVCache, layer: int, row: int) -> torch.Tensor:
    """Row `row`'s keys in `layer`, read through its block table: [length, Hkv, D]."""
    length = int(cache.lengths[row])
    positions = torch.arange(length)
    slots = cache.table[row, positions // cache.block_tokens] * cache.block_tokens
    return cache.keys[layer][slots + positions % cache.block_tokens]


def filled_cache() -> KVCache:
    """Three rows of 5, 2 and 20 tokens (block size 4) with random keys."""
    cache = KVCache(tiny_config(), 4, 0, [0, 2], block_tokens=4)
    cache.reserve(12)
    for row, length in enumerate([5, 2, 20]):
        cache.assign(row, length)
        cache.lengths[row] = length
    for layer in cache.layers:
        cache.keys[layer].copy_(torch.randn_like(cache.keys[layer]))
        cache.values[layer].copy_(torch.randn_like(cache.values[layer]))
    cache.history_start[2] = torch.tensor([1, 0, 3, 0])
    return cache


def test_blocks_are_assigned_from_the_pool_and_freed() -> None:
    cache = filled_cache()
    assert [len(b) for b in cache.row_blocks] == [2, 1, 5, 0]
    assert cache.blocks_in_use == 8 and len(cache.free) == 12 - 1 - 8
    held = [b for blocks in cache.row_blocks for b in blocks]
    assert SCRATCH_BLOCK not in held and len(set(held)) == len(held)
    with pytest.raises(ValueError, match="4 blocks needed, 3 free"):
        cache.assign(3, 13)
    cache.clear_row(2)
    assert cache.blocks_in_use == 3 and len(cache.free) == 8
    assert cache.lengths[2] == 0 and cache.history_start[2][2] == 0
    assert bool((cache.table[2] == SCRATCH_BLOCK).all())


def test_a_row_view_writes_through() -> None:
    cache = filled_cache()
    view = cache.rows(1, 3)
    assert view.batch_size == 2 and view.lengths.tolist() == [2, 20]
    view.lengths += 1
    assert cache.lengths.tolist() == [5, 3, 21, 0]
    assert view.history_start[2].tolist() == [0, 3]
    key = torch.full((2, 2, 1, 16), 42.0)  # [B, Hkv, T, D]
    positions = torch.tensor([[1], [7]])
    keys, _ = view.update(0, key, key, positions, kv_len=8)
    assert keys.shape == (2, 2, 8, 16)
    assert bool((tokens_of(cache, 0, 1)[1] == 42.0).all())
    assert bool((tokens_of(cache, 0, 2)[7] == 42.0).all())
    assert torch.equal(keys[1, :, :8].transpose(0, 1), tokens_of(cache, 0, 2)[:8])
    with pytest.raises(ValueError, match="outside"):
        cache.rows(2, 5)


def test_arrange_moves_tables_not_tokens() -> None:
    cache = filled_cache()
    before = [tokens_of(cache, 2, row).clone() for row in range(3)]
    pools = {layer: cache.keys[layer].data_ptr() for layer in cache.layers}
    cache.arrange([2, 0, 1])
    assert cache.lengths.tolist() == [20, 5, 2, 0]
    assert cache.history_start[2].tolist() == [3, 1, 0, 0]
    for row, old in enumerate([2, 0, 1]):
        assert torch.equal(tokens_of(cache, 2, row), before[old])
    assert pools == {layer: cache.keys[layer].data_ptr() for layer in cache.layers}
    with pytest.raises(ValueError, match="not a permutation"):
        cache.arrange([0, 0])


def test_pool_grows_and_compacts_keeping_every_token() -> None:
    cache = filled_cache()
    cache.clear_row(0)  # frees two low blocks, so compaction has room below
    before = {row: tokens_of(cache, 0, row).clone() for row in (1, 2)}
    values = {row: cache.values[2][cache.table[row, 0] * 4].clone() for row in (1, 2)}
    cache.reserve(7)  # 6 blocks in use + scratch
    assert cache.num_blocks == 7 and cache.keys[0].shape[0] == 7 * 4
    assert max(b for blocks in cache.row_blocks for b in blocks) < 7 and not cache.free
    for row in (1, 2):
        assert torch.equal(tokens_of(cache, 0, row), before[row])
        assert torch.equal(cache.values[2][cache.table[row, 0] * 4], values[row])
    with pytest.raises(ValueError, match="6 blocks are in use"):
        cache.reserve(6)
    cache.reserve(20)
    assert len(cache.free) == 13 and cache.free[-1] == 7  # the lowest goes first
    assert cache.reserved_bytes() == 2 * 2 * (20 * 4 * 2 * 16 * 4)
    for row in (1, 2):
        assert torch.equal(tokens_of(cache, 0, row), before[row])


def test_dropped_layer_frees_its_pool_and_a_restored_one_starts_at_the_switch() -> None:
    cache = filled_cache()
    held = cache.reserved_bytes()
    cache.sync_layers([True, False, False, False])
    assert cache.layers == [0] and cache.reserved_bytes() == held // 2
    assert 2 not in cache.history_start
    cache.sync_layers([True, True, False, False])
    assert cache.history_start[1].tolist() == [5, 2, 20, 0]
    assert cache.reserved_bytes() == held


def test_fragmented_blocks_give_the_full_forward_logits(tiny_model: ElasticLlama) -> None:
    """Rows whose blocks interleave in the pool (assigned a block at a time,
    round robin, as a serving loop grows them) and a ragged prefill compute
    what the model computes without any cache."""
    torch.manual_seed(5)
    tokens = torch.randint(0, 256, (3, 14))
    lengths = [9, 3, 6]
    layers = [i for i, keep in enumerate(tiny_model.plan.keep_attention) if keep]
    cache = KVCache(tiny_model.config, 3, 0, layers, block_tokens=4)
    cache.reserve(1 + 3 * 4)
    for blocks in range(1, 5):  # round robin: row 0 holds blocks 1, 4, 7, 10
        for row in range(3):
            cache.assign(row, 4 * blocks)
    assert cache.row_blocks[0] == [1, 4, 7, 10]
    padded = tokens[:, :9].clone()
    for row, length in enumerate(lengths):
        padded[row, length:] = 0
    with torch.inference_mode():
        steps = [tiny_model(padded, cache, input_lengths=torch.tensor(lengths), last_only=True)]
        for step in range(4):
            ids = torch.stack([tokens[row, length + step] for row, length in enumerate(lengths)])
            steps.append(tiny_model(ids[:, None], cache))
        for row, length in enumerate(lengths):
            full = tiny_model(tokens[row : row + 1, : length + 4])[0]  # no cache at all
            got = torch.stack([step[row, -1] for step in steps])
            torch.testing.assert_close(got, full[length - 1 :], atol=1e-5, rtol=1e-5)
