"""The paged KV cache's operations the serving loop relies on: assigning
and freeing blocks, row views that write through, reordering rows without
copying tokens, growing or compacting the pool with every token kept, and
int8 storage (codes and scales, and level changes that keep the tokens)."""

from __future__ import annotations

import pytest
import torch

from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.kvcache import SCRATCH_BLOCK, KVCache, quantize_int8
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import kv_bytes_per_token


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


def test_int8_codes_are_within_half_a_step_and_empty_slots_stay_zero() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 5, 2, 16) * torch.tensor([0.01, 100.0])[:, None]  # heads far apart
    x[0, 0] = 0.0  # a never-written slot
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 5, 2)
    assert bool((scale[0, 0] == 0).all()) and bool((codes[0, 0] == 0).all())
    # Each head has its own scale: the small head keeps its precision.
    error = (codes.float() * scale[..., None] - x).abs()
    assert bool((error <= scale[..., None] / 2 + 1e-7).all())
    assert int(codes.abs().amax()) == 127


def test_an_int8_layer_stores_codes_and_scales_and_reads_them_dequantized() -> None:
    cache = KVCache(tiny_config(), 2, 0, [0, 1], block_tokens=4, int8_layers=[1])
    cache.reserve(6)
    for row in range(2):
        cache.assign(row, 7)
    assert cache.level(0) == "full" and cache.level(1) == "int8"
    assert cache.keys[1].dtype == torch.int8 and cache.key_scales[1].shape == (24, 2)
    torch.manual_seed(3)
    key, value = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)  # [B, Hkv, T, D]
    positions = torch.arange(7).expand(2, 7)
    full_keys, _ = cache.update(0, key, value, positions, kv_len=7)
    assert torch.equal(full_keys, key)  # read before the next layer reuses the workspace
    keys, values = cache.update(1, key, value, positions, kv_len=7)
    for got, sent in ((keys, key), (values, value)):
        codes, scale = quantize_int8(sent.transpose(1, 2))
        expected = (codes.float() * scale[..., None]).transpose(1, 2)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The bytes are what the memory model counts per token at each level.
    config = tiny_config()
    per_slot = kv_bytes_per_token(config, torch.float32) + kv_bytes_per_token(
        config, torch.float32, "int8"
    )
    assert cache.reserved_bytes() == 24 * per_slot
    cache.lengths[:] = 7
    assert cache.used_bytes() == 14 * per_slot


def test_a_layer_changing_kv_level_keeps_every_row_s_tokens() -> None:
    cache = filled_cache()
    full = {row: tokens_of(cache, 2, row).clone() for row in (0, 1, 2)}
    held = cache.reserved_bytes()
    cache.sync_layers([True, False, True, False], ["full", "full", "int8", "full"])
    assert cache.level(2) == "int8" and cache.level(0) == "full"
    index = cache.table[2, 0] * 4
    scale = cache.key_scales[2][index]
    error = (cache.keys[2][index].float() * scale[:, None] - full[2][0]).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())  # quantized where they lie
    assert cache.reserved_bytes() < held
    # Back at full: the dequantized tokens, every row still whole; the
    # compaction and growth of the pool move the int8 layer's scales too.
    cache.clear_row(0)
    cache.reserve(7)
    cache.reserve(9)
    cache.sync_layers([True, False, True, False])
    assert cache.level(2) == "full" and not cache.key_scales
    for row in (1, 2):
        torch.testing.assert_close(tokens_of(cache, 2, row), full[row], atol=0.05, rtol=0)
    assert cache.history_start[2].tolist() == [0, 0, 3, 0]  # a level change keeps the history
