"""Precision levels: quantization numerics, the model's levels between
decode steps, and their exact bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.config import llama2_7b_config, llama3_8b_config
from elasticfleet.worker.model.kernels import PACKED, PLAIN, measure_kernels
from elasticfleet.worker.model.llama import ElasticLlama, dense
from elasticfleet.worker.model.memory import (
    block_bytes_at,
    int4_group_size,
    kv_bytes_per_token,
    predict_memory,
)
from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan
from elasticfleet.worker.model.quant import DEQUANT, OP, QuantLinear

DTYPES = [torch.float32, torch.bfloat16]


def _weight(out: int = 96, inp: int = 128) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(5)) * 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [INT8, INT4])
def test_kernels_match_the_dequantized_reference(level: str, dtype: torch.dtype) -> None:
    weight = _weight()
    reference = QuantLinear(weight, level, dtype, DEQUANT)
    op = QuantLinear(weight, level, dtype, OP)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(6)).to(dtype)
    expected = F.linear(x.float(), reference.dequantized().float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert op(x).shape == (3, 5, 96)
    assert torch.allclose(op(x).float(), expected, atol=tolerance, rtol=tolerance)
    assert torch.allclose(reference(x).float(), expected, atol=tolerance, rtol=tolerance)
    # The dequantized weight is one rounding from the original: int8 within
    # half a step of its channel's scale, int4 within half a step of its group's.
    error = (reference.dequantized().float() - weight).abs()
    if level == INT8:
        step = weight.abs().amax(dim=1, keepdim=True) / 127
    else:
        groups = weight.reshape(96, -1, int4_group_size(128))
        spread = groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)
        step = (spread / 15).expand_as(groups).reshape(96, 128)
    slack = 1e-6 if dtype == torch.float32 else 1e-2 * weight.abs().max()
    assert bool((error <= step / 2 + slack).all())


def test_quantized_storage_is_what_the_memory_model_counts() -> None:
    weight = _weight(96, 160)  # 160 inputs: int4 falls back to groups of 32
    assert int4_group_size(160) == 32 and int4_group_size(576) == 64
    int8 = QuantLinear(weight, INT8, torch.bfloat16, OP)
    assert (int8.weight.dtype, tuple(int8.weight.shape)) == (torch.int8, (96, 160))
    assert (int8.scales.dtype, tuple(int8.scales.shape)) == (torch.bfloat16, (96,))
    for kernel in (OP, DEQUANT):
        int4 = QuantLinear(weight, INT4, torch.float32, kernel)
        assert int4.weight.numel() * int4.weight.element_size() == 96 * 160 // 2
        assert tuple(int4.scales.shape) == (160 // 32, 96, 2)
    with pytest.raises(ValueError, match="divisible by one of"):
        QuantLinear(_weight(8, 40), INT4, torch.float32, OP)


def test_llama_shapes_by_hand() -> None:
    """Each level's bytes for Llama-2-7B (fp16, MHA) and Llama-3-8B (bf16,
    GQA), worked out by hand from the projection shapes."""
    l2, l3 = llama2_7b_config(), llama3_8b_config()
    # Llama-2-7B attention: 4 x 4096 x 4096 weights, norm 4096.
    assert block_bytes_at(l2, 0, FULL, "float16") == 4 * 4096 * 4096 * 2 + 4096 * 2
    # int8: a byte a weight, a 2-byte scale per output channel (4 x 4096).
    assert block_bytes_at(l2, 0, INT8, "float16") == 67_108_864 + 32_768 + 8_192
    # int4: half a byte a weight, scale and zero (2 x 2 bytes) per 64 inputs
    # of each output: 4 projections x 64 groups x 4096 outputs x 4 bytes.
    assert block_bytes_at(l2, 0, INT4, "float16") == 33_554_432 + 4_194_304 + 8_192
    # FFN: gate and up 11008 x 4096, down 4096 x 11008 (172 groups of 64).
    assert block_bytes_at(l2, 1, INT8, "float16") == 135_266_304 + 52_224 + 8_192
    assert block_bytes_at(l2, 1, INT4, "float16") == 67_633_152 + 8_454_144 + 8_192
    assert block_bytes_at(l2, 1, DROPPED, "float16") == 0
    # Llama-3-8B: q and o 4096 x 4096, k and v 1024 x 4096.
    assert block_bytes_at(l3, 0, FULL, "bfloat16") == 83_886_080 + 8_192
    assert block_bytes_at(l3, 0, INT8, "bfloat16") == 41_943_040 + 20_480 + 8_192
    assert block_bytes_at(l3, 0, INT4, "bfloat16") == 20_971_520 + 2_621_440 + 8_192
    # FFN 14336 wide: gate/up 64 groups, down 224 groups, 4096 outputs.
    assert block_bytes_at(l3, 1, INT8, "bfloat16") == 176_160_768 + 65_536 + 8_192
    assert block_bytes_at(l3, 1, INT4, "bfloat16") == 88_080_384 + 11_010_048 + 8_192
    # KV at int8: 2 x 8 heads x 128 bytes plus a 2-byte scale per head for each.
    assert kv_bytes_per_token(l3, "bfloat16", INT8) == 2048 + 32
    assert kv_bytes_per_token(l3, "bfloat16") == 4096
    # The whole of Llama-3-8B at int8 with int8 KV, batch 4 x 1024 tokens:
    # embeddings and head (2 x 128256 x 4096) and the final norm in bf16.
    plan = PruningPlan.from_levels([INT8] * 64, [INT8] * 32)
    estimate = predict_memory(l3, plan, batch=4, seq_len=1024, dtype="bfloat16")
    assert estimate.weight_bytes == 2_101_354_496 + 32 * (41_971_712 + 176_234_496)
    assert estimate.kv_bytes == 32 * 2080 * 4 * 1024


@pytest.mark.parametrize(
    "levels",
    [
        [INT8, INT4, FULL, INT8, DROPPED, INT4, INT8, FULL],
        [INT4] * 8,
        [INT8] * 8,
        [DROPPED, INT8, INT8, DROPPED, FULL, INT4, DROPPED, DROPPED],
    ],
)
def test_levels_apply_and_the_accountant_equals_the_prediction(
    tiny_model: ElasticLlama, levels: list[str]
) -> None:
    dense_logits = _logits(tiny_model)
    plan = PruningPlan.from_levels(levels)
    tiny_model.apply_plan(plan)
    assert tiny_model.plan == plan
    predicted = predict_memory(tiny_model.config, plan, batch=1, seq_len=1)
    assert account(tiny_model).weight_bytes == predicted.weight_bytes
    if DROPPED not in levels:  # quantized, not pruned: close to the dense model
        error = (_logits(tiny_model) - dense_logits).norm() / dense_logits.norm()
        assert error < (0.05 if INT4 not in levels else 0.4)  # random weights: int4 is coarse


def test_an_int8_kv_cache_holds_what_the_memory_model_counts(tiny_model: ElasticLlama) -> None:
    plan = PruningPlan.from_levels([INT8, FULL, DROPPED, INT4, FULL] + [FULL] * 3, [INT8] * 4)
    tiny_model.apply_plan(plan)
    cache = tiny_model.new_cache(2, 32)
    assert cache.layers == [0, 2, 3] and {cache.level(i) for i in cache.layers} == {INT8}
    measured = account(tiny_model, cache)
    predicted = predict_memory(tiny_model.config, plan, cache.num_blocks, cache.block_tokens)
    assert measured.kv_reserved_bytes == predicted.kv_bytes
    full_kv = predict_memory(tiny_model.config, PruningPlan.from_levels(plan.levels()), 1, 1)
    assert predicted.kv_bytes < cache.num_blocks * cache.block_tokens * full_kv.kv_bytes / 2


def test_every_level_change_reads_the_stored_weights(
    tiny_model: ElasticLlama, tiny_model_dir: Path
) -> None:
    """int8 -> int4 quantizes from the file (equal to quantizing the full
    weights directly), and full comes back bit-identical."""
    fresh = {k: dense(v).clone() for k, v in tiny_model.state_dict().items()}
    dense_logits = _logits(tiny_model)
    tiny_model.apply_plan(PruningPlan.from_levels([INT8] * 8))
    tiny_model.apply_plan(PruningPlan.from_levels([INT4] * 8))
    direct = ElasticLlama.from_pretrained(
        tiny_model_dir, plan=PruningPlan.from_levels([INT4] * 8), packed=tiny_model.packed
    )
    assert torch.equal(_logits(tiny_model), _logits(direct))
    tiny_model.apply_plan(PruningPlan.dense(4))
    restored = tiny_model.state_dict()
    assert restored.keys() == fresh.keys()
    assert all(torch.equal(dense(restored[k]), fresh[k]) for k in fresh)
    assert torch.equal(_logits(tiny_model), dense_logits)


def test_a_malformed_level_plan_changes_nothing(tiny_model: ElasticLlama) -> None:
    tiny_model.apply_plan(PruningPlan.from_levels([INT8] * 8))
    before = _logits(tiny_model)
    with pytest.raises(ValueError, match="unknown block level 'int3'"):
        PruningPlan.from_levels([INT4] * 7 + ["int3"])
    with pytest.raises(ValueError, match="precision holds 'dropped'"):
        PruningPlan((True,) * 4, (True,) * 4, (DROPPED,) * 8)
    with pytest.raises(ValueError, match="plan is for 5 layers"):
        tiny_model.apply_plan(PruningPlan.from_levels([INT4] * 10))
    assert tiny_model.plan == PruningPlan.from_levels([INT8] * 8)
    assert torch.equal(_logits(tiny_model), before)


def test_plan_ladder_steps_and_meet() -> None:
    plan = PruningPlan.from_levels([FULL, INT8, INT4, DROPPED])
    assert plan.to_mask() == [True, True, True, False]
    assert plan.demotions() == [("block", 0), ("block", 1), ("block", 2), ("kv", 0), ("kv", 1)]
    assert plan.demote(("block", 2)).levels() == [FULL, INT8, DROPPED, DROPPED]
    assert plan.demote(("kv", 1)).kv_levels() == [FULL, INT8]
    other = PruningPlan.from_levels([INT4, FULL, INT8, FULL], [INT8, FULL])
    meet = plan.meet(other)
    assert meet is not None
    assert meet.levels() == [INT4, INT8, INT4, DROPPED]
    assert meet.kv_levels() == [INT8, FULL]
    # Pruning-only plans keep their old identity: no precision fields.
    assert PruningPlan.from_levels([FULL, DROPPED, FULL, FULL]) == PruningPlan.from_mask(
        [True, False, True, True]
    )
    last = PruningPlan.from_levels([INT4, DROPPED, DROPPED, DROPPED])
    assert last.demotions() == [("kv", 0)]  # the last block is never dropped
    assert "2 int8, 0 int4" in PruningPlan.from_levels([INT8, INT8, FULL, FULL]).describe()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_choice_is_measured_among_the_candidates(dtype: torch.dtype) -> None:
    choice = measure_kernels([(96, 128)], dtype, torch.device("cpu"), repeats=3)
    assert set(choice.measured) == {(FULL, 96, 128), (INT8, 96, 128), (INT4, 96, 128)}
    for shape, times in choice.measured.items():
        assert choice.chosen[shape] == min(times, key=times.__getitem__)
        assert all(us > 0 for us in times.values())
    assert choice.kernel(FULL, 96, 128) in (PACKED, PLAIN)
    assert "int8 96x128" in choice.describe()


def _logits(model: ElasticLlama) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.arange(12).reshape(2, 6) % 200)
    return logits


def test_bf16_serving_counts_every_byte_in_bf16(tiny_model_dir: Path) -> None:
    plan = PruningPlan.from_levels([INT8, FULL, INT4, DROPPED, FULL, INT8, INT4, FULL])
    model = ElasticLlama.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, plan=plan)
    assert {p.dtype for p in model.parameters()} <= {torch.bfloat16, torch.int8, torch.uint8}
    cache = model.new_cache(batch_size=2, capacity=12)
    with torch.inference_mode():
        logits = model(torch.ones(2, 5, dtype=torch.long), cache)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    report = account(model, cache)
    # The paged pool: scratch + 2 rows x 1 block (12 positions in blocks of 16).
    blocks, block_tokens = cache.num_blocks, cache.block_tokens
    predicted = predict_memory(model.config, plan, blocks, block_tokens, dtype="bfloat16")
    assert (report.weight_bytes, report.kv_reserved_bytes) == (
        predicted.weight_bytes,
        predicted.kv_bytes,
    )
