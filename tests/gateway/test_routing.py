"""The routing rules (gateway/routing.py) on views built by hand, and the
quality estimate the views carry (PlanRatios)."""

from __future__ import annotations

import pytest

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.gateway.pool import PlanRatios
from elasticfleet.gateway.routing import (
    AdapterRef,
    LoadedAdapter,
    NoRoute,
    Route,
    WorkerView,
    check_ratio,
    choose,
)
from elasticfleet.worker.model.plan import PruningPlan

QA = AdapterRef("set", "qa")


def view(name: str, **fields: object) -> WorkerView:
    values: dict[str, object] = {"ready": True, "ratio": 1.0, "free_kv_bytes": 1000}
    values.update(fields)
    return WorkerView(name, f"{name}:1", **values)  # type: ignore[arg-type]


def holding(*tasks: str, router: bool = False) -> dict[str, LoadedAdapter]:
    return {"set": LoadedAdapter(tasks, router)}


def test_the_least_loaded_worker_wins_then_the_most_free_kv() -> None:
    views = [view("a", active=3), view("b", active=1, queue_depth=1), view("c", active=2)]
    assert choose(views) == Route("b")
    views = [view("a", free_kv_bytes=10), view("b", free_kv_bytes=30), view("c", active=1)]
    assert choose(views) == Route("b")


def test_the_gateways_own_streams_count_before_the_next_poll() -> None:
    """Between two polls a burst must not all land on one worker."""
    assert choose([view("a", streams=2), view("b", active=1)]) == Route("b")


def test_a_worker_under_the_floor_or_of_unknown_quality_is_not_eligible() -> None:
    views = [view("dense"), view("heavy", ratio=3.0), view("unknown", ratio=None)]
    for name in ("dense", "heavy", "unknown"):
        busy = [v if v.name == name else view(v.name, ratio=v.ratio, active=9) for v in views]
        picked = choose(busy, max_ratio=1.5)
        assert picked == Route("dense"), (name, picked)
    assert choose(views[1:], max_ratio=2.0) == NoRoute(
        "no worker's plan is predicted within perplexity ratio 2.00; the best now is 3.00"
    )
    assert choose(views[1:]) == Route("heavy")  # no floor: any plan


def test_unready_full_and_excluded_workers_are_skipped() -> None:
    views = [view("down", ready=False), view("full", streams=4), view("failed")]
    assert choose(views, max_streams=4, exclude=("failed",)) == NoRoute(
        "every eligible worker has 4 streams open"
    )
    assert isinstance(choose(views[:1]), NoRoute)
    assert choose(views, max_streams=4) == Route("failed")


def test_adapter_requests_go_to_a_holder_else_load_on_the_least_loaded() -> None:
    views = [view("a", active=2, adapters=holding("qa")), view("b"), view("c", active=5)]
    assert choose(views, adapter=QA) == Route("a")
    assert choose(views, adapter=AdapterRef("set", "code")) == Route("b", load_adapter=True)
    # The router mixture needs a holder loaded with its router.
    assert choose(views, adapter=AdapterRef("set")) == Route("b", load_adapter=True)
    views[0].adapters = holding("qa", router=True)
    assert choose(views, adapter=AdapterRef("set")) == Route("a")


def test_a_load_under_way_counts_as_holding_the_task() -> None:
    """A burst for a task nobody has loads it once, not once per worker."""
    views = [view("a", active=3, loading={"set:qa"}), view("b")]
    assert choose(views, adapter=QA) == Route("a")
    assert choose(views, adapter=AdapterRef("set", "code")) == Route("b", load_adapter=True)


def test_at_equal_load_the_better_plan_wins() -> None:
    views = [view("a-heavy", ratio=2.0, free_kv_bytes=5000), view("b-dense"), view("c", ratio=None)]
    assert choose(views) == Route("b-dense")
    assert choose(views, adapter=QA) == Route("b-dense", load_adapter=True)


def test_a_popular_task_spreads_once_its_holders_are_far_busier() -> None:
    views = [view("a", active=10, adapters=holding("qa")), view("b", active=1)]
    assert choose(views, adapter=QA, spread_after=8) == Route("b", load_adapter=True)
    views[0].active = 9
    assert choose(views, adapter=QA, spread_after=8) == Route("a")


def test_the_floor_applies_before_affinity() -> None:
    views = [view("heavy", ratio=4.0, adapters=holding("qa")), view("dense", active=3)]
    assert choose(views, adapter=QA, max_ratio=2.0) == Route("dense", load_adapter=True)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("qa-set:qa", AdapterRef("qa-set", "qa")), ("qa-set", AdapterRef("qa-set", None))],
)
def test_adapter_ids_parse(text: str, parsed: AdapterRef) -> None:
    assert AdapterRef.parse(text) == parsed and str(parsed) == text


@pytest.mark.parametrize("text", ["", ":qa", "set:", "x" * 129 + ":qa", "set:" + "t" * 64])
def test_bad_adapter_ids_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="adapter"):
        AdapterRef.parse(text)


def test_quality_floors_are_numbers_of_at_least_one() -> None:
    assert check_ratio(None, "x") is None
    assert check_ratio("1.5", "x") == 1.5 and check_ratio(2, "x") == 2.0
    for bad in ("fast", 0.9, float("nan"), float("inf"), [1]):
        with pytest.raises(ValueError, match="x must"):
            check_ratio(bad, "x")


def test_plan_ratios_follow_the_profile_and_need_none_for_a_dense_plan() -> None:
    profile = ModelProfile.load(DEFAULT_PROFILE)
    asked: list[str] = []

    def lookup(model: str) -> ModelProfile:
        asked.append(model)
        if model != profile.model_name:
            raise ValueError("no profile")
        return profile

    ratios = PlanRatios(lookup)
    layers = profile.num_blocks // 2
    plan = PruningPlan.from_dropped(layers, [20, 25], [3])
    expected = ProfileQuality(profile)(plan) / profile.dense_perplexity
    assert expected > 1.0
    assert ratios(profile.model_name, plan.to_mask()) == pytest.approx(expected)
    assert ratios("other", [True] * 8) == 1.0  # dense: known without a profile
    assert ratios("other", [False] + [True] * 7) is None
    assert ratios("other", [False] + [True] * 7) is None
    assert asked == [profile.model_name, "other"]  # each model looked up once
