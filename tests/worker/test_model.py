"""The elastic model on a tiny random config: forward pass, KV cache, and
dropping/restoring blocks."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.llama import Attention, ElasticLlama, FeedForward, dense
from elasticfleet.worker.model.plan import PruningPlan

torch.manual_seed(0)
TOKENS = torch.randint(0, 256, (3, 12))


def logits(model: ElasticLlama, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(ids)
    return out


def attention(model: ElasticLlama, index: int) -> Attention:
    block = model.layer(index).self_attn
    assert block is not None
    return block


def ffn(model: ElasticLlama, index: int) -> FeedForward:
    block = model.layer(index).mlp
    assert block is not None
    return block


def test_incremental_decode_matches_full_forward(tiny_model: ElasticLlama) -> None:
    full = logits(tiny_model)
    cache = tiny_model.new_cache(3, 16)
    with torch.inference_mode():
        steps = [tiny_model(TOKENS[:, :8], cache)[:, -1]]
        steps += [tiny_model(TOKENS[:, t : t + 1], cache)[:, -1] for t in range(8, 12)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [12, 12, 12]


def test_ragged_batch_matches_rows_alone(tiny_model: ElasticLlama) -> None:
    lengths = torch.tensor([12, 5, 9])
    padded = TOKENS.clone()
    for row, length in enumerate(lengths.tolist()):
        padded[row, length:] = 0
    cache = tiny_model.new_cache(3, 16)
    with torch.inference_mode():
        last = tiny_model(padded, cache, input_lengths=lengths, last_only=True)[:, 0]
        step = tiny_model(torch.tensor([[7], [8], [9]]), cache)[:, 0]
    for row, length in enumerate(lengths.tolist()):
        alone = torch.cat([TOKENS[row, :length], torch.tensor([7 + row])])[None]
        expected = logits(tiny_model, alone)[0]
        torch.testing.assert_close(last[row], expected[length - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[row], expected[length], atol=1e-5, rtol=1e-5)


def _zeroed_reference(
    model_dir: Path, attn_layers: list[int], ffn_layers: list[int]
) -> ElasticLlama:
    """A dense model whose chosen blocks add nothing to the residual stream:
    dropping a block must be exactly equivalent to that."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    for i in attn_layers:
        attention(model, i).o_proj.weight.zero_()
    for i in ffn_layers:
        ffn(model, i).down_proj.weight.zero_()
    return model


def test_dropped_blocks_are_skipped(tiny_model: ElasticLlama, tiny_model_dir: Path) -> None:
    plan = PruningPlan.from_dropped(4, attention=[1, 3], ffn=[0, 3])
    tiny_model.apply_plan(plan)
    reference = _zeroed_reference(tiny_model_dir, [1, 3], [0, 3])
    torch.testing.assert_close(logits(tiny_model), logits(reference), atol=1e-5, rtol=1e-5)
    assert tiny_model.new_cache(1, 4).layers == [0, 2]


def test_drop_frees_weights_and_restore_is_bit_identical(
    tiny_model: ElasticLlama, tiny_model_dir: Path
) -> None:
    dense_logits = logits(tiny_model)
    dense_state = {k: dense(v).clone() for k, v in tiny_model.state_dict().items()}
    blocks = (attention(tiny_model, 2), ffn(tiny_model, 2))
    watched = [weakref.ref(p) for block in blocks for p in block.parameters()]
    del blocks

    tiny_model.apply_plan(PruningPlan.from_dropped(4, attention=[2], ffn=[2, 1]))
    gc.collect()
    assert all(ref() is None for ref in watched), "a dropped block's tensors are still alive"
    assert not any(".layers.2." in name for name in tiny_model.state_dict())

    tiny_model.apply_plan(PruningPlan.dense(4))
    restored = tiny_model.state_dict()
    assert restored.keys() == dense_state.keys()
    assert all(torch.equal(dense(restored[k]), dense_state[k]) for k in dense_state)
    assert all(t.is_mkldnn == tiny_model.packed for k, t in restored.items() if "proj" in k)
    assert torch.equal(logits(tiny_model), dense_logits)


def test_loading_with_a_plan_equals_applying_it(
    tiny_model: ElasticLlama, tiny_model_dir: Path
) -> None:
    plan = PruningPlan.from_dropped(4, attention=[0], ffn=[1, 2])
    loaded = ElasticLlama.from_pretrained(tiny_model_dir, plan=plan)
    tiny_model.apply_plan(plan)
    assert torch.equal(logits(loaded), logits(tiny_model))
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in tiny_model.parameters()
    )


def test_bad_plan_leaves_model_unchanged(tiny_model: ElasticLlama) -> None:
    before = logits(tiny_model)
    with pytest.raises(ValueError, match="plan is for 5 layers but the model has 4"):
        tiny_model.apply_plan(PruningPlan.dense(5))
    assert tiny_model.plan == PruningPlan.dense(4)
    assert torch.equal(logits(tiny_model), before)


def test_restore_without_weights_file_fails_cleanly(tiny_model: ElasticLlama) -> None:
    plan = PruningPlan.from_dropped(4, ffn=[1])
    tiny_model.apply_plan(plan)
    tiny_model.weights_path = None
    with pytest.raises(ValueError, match="not loaded from a weights file"):
        tiny_model.apply_plan(PruningPlan.from_dropped(4, attention=[0]))
    assert tiny_model.plan == plan
    assert tiny_model.layer(0).self_attn is not None


def test_context_and_cache_limits_are_enforced(tiny_model: ElasticLlama) -> None:
    cache = tiny_model.new_cache(3, 8)
    with pytest.raises(ValueError, match="KV cache holds 8 positions, 12 needed"):
        tiny_model(TOKENS, cache)
    too_long = torch.zeros(1, tiny_model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="beyond the model's context"):
        tiny_model(too_long)


def test_packed_layout_holds_the_same_values(tiny_model_dir: Path) -> None:
    plain = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    packed = ElasticLlama.from_pretrained(tiny_model_dir, packed=True)
    weight = ffn(packed, 0).up_proj.weight
    assert weight.is_mkldnn
    assert torch.equal(weight.to_dense(), ffn(plain, 0).up_proj.weight)
    torch.testing.assert_close(logits(packed), logits(plain), atol=1e-5, rtol=1e-5)


def test_sliced_output_head_matches_plain(tmp_path: Path) -> None:
    """A vocabulary of several 8192-row slices, at decode-like row counts."""
    torch.manual_seed(3)
    ElasticLlama(tiny_config(vocab_size=20000)).save_pretrained(tmp_path)
    plain = ElasticLlama.from_pretrained(tmp_path, packed=False)
    packed = ElasticLlama.from_pretrained(tmp_path, packed=True)
    for shape in [(1, 1), (2, 1), (8, 1), (4, 16), (3, 30)]:
        ids = torch.randint(0, 20000, shape)
        torch.testing.assert_close(logits(packed, ids), logits(plain, ids), atol=1e-5, rtol=1e-5)
