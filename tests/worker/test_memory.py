"""The memory model (predicted bytes) and the accountant (measured bytes)."""

from __future__ import annotations

import pytest
import torch

from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.config import llama2_7b_config, tiny_config
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import (
    decode_flops,
    dtype_bytes,
    kv_bytes_per_token,
    predict_memory,
)
from elasticfleet.worker.model.plan import PruningPlan

GB = 1e9


def test_llama2_7b_dense_matches_rap_figures() -> None:
    estimate = predict_memory(llama2_7b_config(), None, batch=8, seq_len=2048, dtype="float16")
    assert round(estimate.weight_bytes / GB, 2) == 13.48
    assert round(estimate.kv_bytes / GB, 2) == 8.59
    assert round(estimate.total_bytes / GB, 2) == 22.07


def test_llama2_7b_pruned_matches_rap_figures() -> None:
    config = llama2_7b_config()
    plan = PruningPlan.from_dropped(
        32, attention=[18, 19, 21, 23, 24, 25, 27, 28, 30], ffn=[13, 22, 24, 27]
    )
    estimate = predict_memory(config, plan, batch=8, seq_len=2048, dtype=torch.float16)
    assert round(estimate.total_bytes / GB, 2) == 17.36


def test_dtype_names() -> None:
    assert dtype_bytes(torch.bfloat16) == dtype_bytes("float16") == 2
    assert kv_bytes_per_token(tiny_config(), "float32") == 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="unknown dtype 'complex7'"):
        dtype_bytes("complex7")


def _live_bytes(*tensors: torch.Tensor) -> int:
    """Independent tally: distinct storages, each counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize(
    "plan",
    [
        PruningPlan.dense(4),
        PruningPlan.from_dropped(4, attention=[1, 2]),
        PruningPlan.from_dropped(4, attention=[0], ffn=[0, 1, 3]),
    ],
)
def test_accountant_equals_live_tensors_and_prediction(
    tiny_model: ElasticLlama, plan: PruningPlan
) -> None:
    tiny_model.apply_plan(plan)
    cache = tiny_model.new_cache(batch_size=3, capacity=20)
    with torch.inference_mode():
        tiny_model(torch.ones(3, 6, dtype=torch.long), cache, input_lengths=torch.tensor([6, 2, 4]))
    report = account(tiny_model, cache)

    state = tiny_model.state_dict()
    if not tiny_model.packed:  # packed weights hide their storage
        assert report.weight_bytes == _live_bytes(*state.values())
    kv_tensors = [*cache.keys.values(), *cache.values.values()]
    assert report.kv_reserved_bytes == _live_bytes(*kv_tensors)

    # The pool: scratch + 3 rows x 2 blocks of 16 positions (20 rounded up to blocks).
    assert cache.num_blocks == 1 + 3 * 2
    predicted = predict_memory(tiny_model.config, plan, batch=7, seq_len=cache.block_tokens)
    assert report.weight_bytes == predicted.weight_bytes
    assert report.kv_reserved_bytes == predicted.kv_bytes
    used = predict_memory(tiny_model.config, plan, batch=1, seq_len=6 + 2 + 4).kv_bytes
    assert report.kv_used_bytes == used


def test_restored_attention_layer_starts_its_history_at_the_switch(
    tiny_model: ElasticLlama,
) -> None:
    """A block restored mid-sequence holds KV only for tokens after the switch."""
    tiny_model.apply_plan(PruningPlan.from_dropped(4, attention=[1]))
    cache = tiny_model.new_cache(batch_size=2, capacity=16)
    with torch.inference_mode():
        tiny_model(torch.ones(2, 5, dtype=torch.long), cache, input_lengths=torch.tensor([5, 3]))
    tiny_model.apply_plan(PruningPlan.dense(4))
    cache.sync_layers(tiny_model.plan.keep_attention)
    assert cache.history_start[1].tolist() == [5, 3]
    with torch.inference_mode():
        tiny_model(torch.ones(2, 1, dtype=torch.long), cache)
    per_token = kv_bytes_per_token(tiny_model.config, "float32")
    # Three full layers with 6 + 4 tokens, the restored one with 1 + 1.
    assert account(tiny_model, cache).kv_used_bytes == per_token * (3 * 10 + 2)

    tiny_model.apply_plan(PruningPlan.from_dropped(4, attention=[1, 2]))
    cache.sync_layers(tiny_model.plan.keep_attention)
    assert cache.layers == [0, 3]
    assert 1 not in cache.history_start


def test_decode_flops_counts_kept_blocks() -> None:
    config = tiny_config()
    dense = decode_flops(config, None, context=10)
    head = 2 * config.vocab_size * config.hidden_size
    # q and o are 64x64, k and v 64x32; scores and values: 2 x 4 heads x 16 dims x 10 tokens.
    attn = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 4 * 16 * 10)
    ffn = 2 * 3 * 64 * 160
    assert dense == head + 4 * attn + 4 * ffn
    half = PruningPlan.from_dropped(4, attention=[0, 1], ffn=[2, 3])
    assert decode_flops(config, half, context=10) == head + 2 * attn + 2 * ffn
