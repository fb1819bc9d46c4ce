from __future__ import annotations

import pytest

from elasticfleet.worker.model.plan import PruningPlan


def test_mask_round_trip_follows_forward_order() -> None:
    plan = PruningPlan.from_dropped(3, attention=[1], ffn=[0, 2])
    assert plan.to_mask() == [True, False, False, True, True, False]
    assert PruningPlan.from_mask(plan.to_mask(), num_layers=3) == plan
    assert plan.dropped_attention == [1]
    assert plan.dropped_ffn == [0, 2]
    assert plan.kept_blocks == 3


def test_dense_keeps_everything() -> None:
    plan = PruningPlan.dense(4)
    assert plan.kept_blocks == 8
    assert plan == PruningPlan.from_dropped(4)
    assert "8/8 blocks kept" in plan.describe()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PruningPlan.from_mask([True] * 5), "even"),
        (lambda: PruningPlan.from_mask([True] * 6, num_layers=4), "model has 8 blocks"),
        (lambda: PruningPlan.from_dropped(4, attention=[4]), "attention block index 4"),
        (lambda: PruningPlan.from_dropped(4, ffn=[-1]), "FFN block index -1"),
        (lambda: PruningPlan.from_dropped(2, attention=[0, 1], ffn=[0, 1]), "drops every block"),
        (lambda: PruningPlan((True, True), (True,)), "2 attention flags but 1 FFN"),
    ],
)
def test_malformed_plans_name_the_problem(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_check_layers_rejects_other_models() -> None:
    with pytest.raises(ValueError, match="plan is for 3 layers but the model has 30"):
        PruningPlan.dense(3).check_layers(30)


def test_without_blocks_uses_block_numbers() -> None:
    plan = PruningPlan.without_blocks(3, [1, 4])
    assert plan == PruningPlan.from_dropped(3, attention=[2], ffn=[0])
    with pytest.raises(ValueError, match=r"block index 6 is out of range; blocks are 0\.\.5"):
        PruningPlan.without_blocks(3, [6])
