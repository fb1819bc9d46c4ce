"""Budget derivation, the planned load and the quality floor."""

from __future__ import annotations

import pytest

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.operator.budget import (
    BudgetError,
    DeviceFigures,
    QualityFloor,
    QualityFloorError,
    derive_budget,
    planned_load,
)
from elasticfleet.operator.spec import Budget, MemoryPolicy
from elasticfleet.worker.model.memory import blocks_for, predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.admission import Admission

GIB = 2**30


def _policy(
    fraction: float | None = None, size: int | None = None, headroom: int = 0
) -> MemoryPolicy:
    return MemoryPolicy("greedy", Budget(fraction=fraction, bytes=size), headroom_bytes=headroom)


def test_fraction_of_what_others_and_headroom_leave() -> None:
    # 16 GiB device, 6 GiB used of which 2 GiB is the worker's own: others hold 4.
    device = DeviceFigures(total_bytes=16 * GIB, used_bytes=6 * GIB, own_bytes=2 * GIB)
    assert device.others_bytes == 4 * GIB
    assert derive_budget(_policy(fraction=0.5), device) == 6 * GIB
    assert derive_budget(_policy(fraction=0.5, headroom=2 * GIB), device) == 5 * GIB
    assert derive_budget(_policy(fraction=1.0), device) == 12 * GIB


def test_the_worker_growing_does_not_shrink_its_budget() -> None:
    small = DeviceFigures(16 * GIB, 5 * GIB, 1 * GIB)
    grown = DeviceFigures(16 * GIB, 9 * GIB, 5 * GIB)
    assert derive_budget(_policy(fraction=0.8), small) == derive_budget(_policy(0.8), grown)


def test_bytes_are_capped_by_what_is_usable() -> None:
    device = DeviceFigures(16 * GIB, 12 * GIB, 0)
    assert derive_budget(_policy(size=2 * GIB), device) == 2 * GIB
    assert derive_budget(_policy(size=8 * GIB), device) == 4 * GIB
    assert derive_budget(_policy(size=8 * GIB, headroom=GIB), device) == 3 * GIB


def test_own_bytes_above_used_count_no_others() -> None:
    # The host's figures may lag the worker's own accounting.
    assert DeviceFigures(8 * GIB, 1 * GIB, 2 * GIB).others_bytes == 0


def test_no_usable_memory_is_an_error() -> None:
    with pytest.raises(BudgetError, match="no memory left to budget: device 1,073,741,824"):
        derive_budget(_policy(fraction=0.5, headroom=GIB), DeviceFigures(GIB, GIB // 2, 0))


def test_planned_load() -> None:
    # 8 sequences of 1501 tokens: 94 blocks of 16 each, plus the scratch
    # block, are 12,048 positions in the worker's pool, 1506 a sequence.
    load = planned_load(7.2, 1500.1, 0, 8192)
    assert (load.batch_size, load.seq_len) == (8, 1506)
    # Before any request finished: the running sequences stand in, at least
    # 1 x 1; 3 one-token sequences take 3 blocks and the scratch one.
    idle = planned_load(0.0, 0.0, 3, 8192)
    assert (idle.batch_size, idle.seq_len) == (3, 22)
    assert planned_load(0.0, 0.0, 0, 8192).batch_size == 1
    # Tokens are capped by the context; the scratch block comes on top.
    assert planned_load(1.0, 20000.0, 0, 8192).seq_len == 8192 + 16


def test_a_plan_for_the_planned_load_fits_the_workers_admission() -> None:
    """The demo's squeeze: the budget fits the plan's weights and 60 tokens
    of KV, but not the 5 blocks the worker's pool needs to run them."""
    config = ModelProfile.load(DEFAULT_PROFILE).config
    plan = PruningPlan.dense(config.num_hidden_layers)
    weights = predict_memory(config, plan, 0, 0).weight_bytes
    admission = Admission(config, "float32", budget_bytes=0, max_rows=8)
    load = planned_load(1.0, 60.0, 0, 8192)
    admission.budget_bytes = predict_memory(config, plan, load.batch_size, load.seq_len).total_bytes
    assert admission.max_blocks(plan, 0) == 1 + blocks_for(60)
    admission.budget_bytes = weights + predict_memory(config, plan, 1, 60).kv_bytes
    assert admission.max_blocks(plan, 0) < 1 + blocks_for(60)


def test_quality_floor() -> None:
    profile = ModelProfile.load(DEFAULT_PROFILE)
    layers = profile.config.num_hidden_layers
    floor = QualityFloor(profile, 1.5)
    dense = PruningPlan.dense(layers)
    assert floor.ratio(dense) == 1.0 and floor.check(dense) == 1.0
    # The first GSI-ranked block is nearly free; the whole order is not.
    light = PruningPlan.without_blocks(layers, profile.gsi_order[:1])
    assert 1.0 <= floor.ratio(light) < 1.5
    heavy = PruningPlan.without_blocks(layers, profile.gsi_order[:30])
    with pytest.raises(QualityFloorError, match=r"above the floor of 1\.50x"):
        floor.check(heavy)
    assert QualityFloor(profile, None).check(heavy) == floor.ratio(heavy) > 1.5
