"""The policies on the precision ladder, on a synthetic profile with level
costs: each plan fits, cheap rungs go first, and the estimate follows."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_policy import CONFIG, PROFILE, dense_bytes

from elasticfleet.agent.perplexity import PerplexityEvaluator
from elasticfleet.agent.policy import (
    GreedyPolicy,
    Ladder,
    NoFeasiblePlan,
    PolicyState,
    SearchPolicy,
    StaticPolicy,
)
from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.profiling import measure_level_costs
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan

# int8 nearly free everywhere, int4 dear on the FFN blocks, dropping what GSI says.
LADDER_PROFILE = dataclasses.replace(
    PROFILE,
    level_costs={
        INT8: (0.001, 0.002) * 4,
        INT4: (0.01, 0.2) * 4,
    },
)


def state(budget: int, batch: int = 1, seq: int = 16, dtype: str | None = None) -> PolicyState:
    return PolicyState(budget, batch, seq, LADDER_PROFILE, dtype=dtype)


def test_the_ladder_depends_on_what_the_profile_measured() -> None:
    assert Ladder(PROFILE).levels == (FULL, DROPPED)
    assert Ladder(LADDER_PROFILE).levels == (FULL, INT8, INT4, DROPPED)
    assert not Ladder(LADDER_PROFILE).kv
    ladder = Ladder(LADDER_PROFILE)
    plan = PruningPlan.dense(4)
    # A block's step costs add up to what the estimate says of dropping it.
    total, block = 0.0, 6
    while plan.weight_level(block) != DROPPED:
        total += ladder.cost(plan, ("block", block))
        plan = ladder.take(plan, ("block", block))
    estimate = ProfileQuality(LADDER_PROFILE)(plan)
    assert math.isclose(total, math.log(estimate / LADDER_PROFILE.dense_perplexity))


def test_greedy_quantizes_before_it_drops() -> None:
    dense = dense_bytes()
    plan = GreedyPolicy().decide(state(int(dense * 0.8)))
    assert state(int(dense * 0.8)).fits(plan)
    assert plan.kept_blocks == 8 and not plan.pruning_only  # int8 freed enough
    # The pruning-only profile must drop blocks for the same budget.
    pruned = GreedyPolicy().decide(PolicyState(int(dense * 0.8), 1, 16, PROFILE))
    assert pruned.kept_blocks < 8 and pruned.pruning_only
    quality = ProfileQuality(LADDER_PROFILE)
    assert quality(plan) < quality(pruned)


@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.45, 0.3])
@pytest.mark.parametrize(("batch", "seq"), [(1, 16), (8, 256)])
def test_every_ladder_policy_fits_and_search_is_no_worse(
    fraction: float, batch: int, seq: int
) -> None:
    budget = int(dense_bytes(batch, seq) * fraction)
    cell = state(budget, batch, seq)
    quality = ProfileQuality(LADDER_PROFILE)
    try:
        greedy = GreedyPolicy().decide(cell)
    except NoFeasiblePlan:
        with pytest.raises(NoFeasiblePlan):
            SearchPolicy(quality).decide(cell)
        return
    search = SearchPolicy(quality).decide(cell)
    assert cell.fits(greedy) and cell.fits(search)
    assert quality(search) <= quality(greedy) * (1 + 1e-9)


def test_bytes_follow_the_serving_dtype() -> None:
    full = predict_memory(CONFIG, None, 1, 16, "bfloat16").total_bytes
    plan = GreedyPolicy().decide(state(full, dtype="bfloat16"))
    assert plan == PruningPlan.dense(4)  # what fits in bf16 ...
    with pytest.raises(NoFeasiblePlan):  # ... needs a step in float32 at that budget
        StaticPolicy(0.0).decide(state(full))


def test_static_holds_one_ladder() -> None:
    policy = StaticPolicy(0.25, precision=INT8)
    plan = policy.plan(LADDER_PROFILE)
    assert plan.level_counts()[INT8] == 6 and plan.kept_blocks == 6
    assert policy.decide(state(dense_bytes())) == policy.decide(state(dense_bytes(), 4, 64))
    with pytest.raises(ValueError, match="precision must be"):
        StaticPolicy(0.25, precision=DROPPED)


def test_the_estimate_needs_measured_costs() -> None:
    plan = PruningPlan.from_levels([INT8] * 8)
    with pytest.raises(ValueError, match="no int8 costs"):
        ProfileQuality(PROFILE)(plan)
    quality = ProfileQuality(LADDER_PROFILE)
    assert math.isclose(quality(plan), 10.0 * math.exp(4 * 0.001 + 4 * 0.002))


def test_level_costs_round_trip_and_are_validated() -> None:
    raw = LADDER_PROFILE.to_dict()
    assert ModelProfile.from_dict(raw) == LADDER_PROFILE
    assert "level_costs" not in PROFILE.to_dict()  # old profiles stay as they were
    raw["level_costs"] = {INT8: [0.1] * 3}
    with pytest.raises(ValueError, match=r"level_costs\[int8\] has 3 entries"):
        ModelProfile.from_dict(raw)
    raw["level_costs"] = {"fp8": [0.1] * 8}
    with pytest.raises(ValueError, match="level 'fp8'"):
        ModelProfile.from_dict(raw)


def test_greedy_puts_kv_caches_at_int8_when_the_cache_is_what_is_large() -> None:
    """With int8 KV measured nearly free, a long-context load frees its
    bytes from the KV caches rather than by quantizing weights."""
    profile = dataclasses.replace(
        LADDER_PROFILE, level_costs=LADDER_PROFILE.level_costs | {"kv_int8": (0.0005,) * 4}
    )
    assert Ladder(profile).kv
    full = predict_memory(CONFIG, None, 8, 256).total_bytes
    squeezed = PolicyState(int(full * 0.8), 8, 256, profile)
    plan = GreedyPolicy().decide(squeezed)
    assert squeezed.fits(plan) and INT8 in plan.kv_levels()
    assert plan.levels() == [FULL] * 8  # no weight touched
    # Without the KV costs measured, the same squeeze quantizes weights.
    weights_only = GreedyPolicy().decide(PolicyState(int(full * 0.8), 8, 256, LADDER_PROFILE))
    assert weights_only.levels() != [FULL] * 8 and INT8 not in weights_only.kv_levels()


def test_level_costs_are_measured_for_every_block_and_kv_cache(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    costs = measure_level_costs(plain_model, tiny_windows)
    assert plain_model.plan == PruningPlan.dense(4)  # left dense
    assert {level: len(c) for level, c in costs.items()} == {INT8: 8, INT4: 8, "kv_int8": 4}
    evaluator = PerplexityEvaluator(plain_model, tiny_windows, batch_size=4)
    dense = math.log(evaluator.evaluate(PruningPlan.dense(4)))
    kv_layer_1 = PruningPlan.from_levels([FULL] * 8, [FULL, INT8, FULL, FULL])
    assert costs["kv_int8"][1] == pytest.approx(math.log(evaluator.evaluate(kv_layer_1)) - dense)
    assert all(abs(c) < 0.05 for c in costs["kv_int8"]) and any(costs["kv_int8"])
