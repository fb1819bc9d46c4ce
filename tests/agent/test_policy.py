"""Pruning policies against the shared memory model, on a synthetic profile."""

from __future__ import annotations

import itertools
import random

import pytest

from elasticfleet.agent.policy import (
    GreedyPolicy,
    NoFeasiblePlan,
    NonePolicy,
    Policy,
    PolicyState,
    SearchPolicy,
    StaticPolicy,
)
from elasticfleet.agent.profile import ModelProfile, block_bytes
from elasticfleet.agent.quality import block_importance
from elasticfleet.agent.registry import (
    ADAPTIVE_POLICIES,
    POLICIES,
    REGISTRY,
    SERVING_POLICIES,
    make_policy,
)
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

CONFIG = tiny_config()  # 4 layers, 8 blocks


def synthetic_profile(gsi_order: tuple[int, ...] = (7, 5, 6, 3)) -> ModelProfile:
    """GSI reached four blocks; perplexity grows 10 -> 11 -> 13 -> 16 -> 20."""
    weights, kv = block_bytes(CONFIG, "float32")
    proxy = tuple(0.1 * (8 - b) for b in range(8))  # shallower blocks matter more
    return ModelProfile(
        model_name="tiny",
        config=CONFIG,
        dtype="float32",
        block_weight_bytes=weights,
        block_kv_bytes_per_token=kv,
        dense_perplexity=10.0,
        gsi_order=gsi_order,
        gsi_perplexity=(11.0, 13.0, 16.0, 20.0)[: len(gsi_order)],
        proxy_order=tuple(sorted(range(8), key=lambda b: proxy[b])),
        proxy_scores=proxy,
        eval_tokens=1000,
        meta={},
    )


PROFILE = synthetic_profile()


def state(budget: int, batch: int = 1, seq: int = 16) -> PolicyState:
    return PolicyState(budget_bytes=budget, batch_size=batch, seq_len=seq, profile=PROFILE)


def dense_bytes(batch: int = 1, seq: int = 16) -> int:
    return predict_memory(CONFIG, None, batch, seq).total_bytes


def test_none_policy_is_dense_or_nothing() -> None:
    assert NonePolicy().decide(state(dense_bytes())) == PruningPlan.dense(4)
    with pytest.raises(NoFeasiblePlan, match="none policy: it never prunes"):
        NonePolicy().decide(state(dense_bytes() - 1))


def test_static_policy_ignores_the_load() -> None:
    policy = StaticPolicy(0.25)
    expected = PruningPlan.without_blocks(4, [7, 5])  # the two least important blocks
    assert policy.decide(state(dense_bytes())) == expected
    assert policy.decide(state(dense_bytes(2, 64), batch=2, seq=64)) == expected
    with pytest.raises(NoFeasiblePlan, match="fixed ratio 25% is too low"):
        policy.decide(state(dense_bytes() // 2))
    with pytest.raises(ValueError, match="ratio must be in"):
        StaticPolicy(1.0)


def test_importance_follows_gsi_then_proxy() -> None:
    scores = block_importance(PROFILE)
    reached = [scores[b] for b in PROFILE.gsi_order]
    assert reached == pytest.approx([0.0953, 0.1671, 0.2076, 0.2231], abs=1e-3)
    assert min(scores[b] for b in range(8) if b not in PROFILE.gsi_order) > max(reached)
    assert scores[0] > scores[1]  # proxy: shallower first blocks matter more


def test_greedy_stops_as_soon_as_the_plan_fits() -> None:
    budget = int(dense_bytes() * 0.7)
    plan = GreedyPolicy().decide(state(budget))
    assert state(budget).fits(plan)
    dropped = [b for b, keep in enumerate(plan.to_mask()) if not keep]
    for block in dropped:  # putting back any one dropped block breaks the budget
        fewer = PruningPlan.without_blocks(4, [b for b in dropped if b != block])
        assert not state(budget).fits(fewer)


def test_greedy_drops_attention_under_long_context_and_ffn_under_light_load() -> None:
    flat = synthetic_profile(gsi_order=())  # equal importance: bytes decide
    flat = ModelProfile(**{**flat.__dict__, "proxy_scores": (0.0,) * 8})

    def dropped_kinds(batch: int, seq: int) -> set[str]:
        budget = int(predict_memory(CONFIG, None, batch, seq).total_bytes * 0.8)
        plan = GreedyPolicy().decide(
            PolicyState(budget_bytes=budget, batch_size=batch, seq_len=seq, profile=flat)
        )
        return {"attention" if b % 2 == 0 else "ffn" for b, k in enumerate(plan.to_mask()) if not k}

    assert dropped_kinds(batch=16, seq=256) == {"attention"}
    assert dropped_kinds(batch=1, seq=2) == {"ffn"}


def test_search_is_exhaustive_on_small_models() -> None:
    def score(plan: PruningPlan) -> float:  # additive: sum of dropped blocks' "damage"
        return sum((b + 1) ** 2 for b, keep in enumerate(plan.to_mask()) if not keep)

    budget = int(dense_bytes() * 0.6)
    best = SearchPolicy(score).decide(state(budget))
    fitting = [
        PruningPlan.from_mask(m)
        for m in itertools.product((True, False), repeat=8)
        if any(m) and state(budget).fits(PruningPlan.from_mask(m))
    ]
    assert score(best) == min(score(p) for p in fitting)

    beam = SearchPolicy(score, beam_width=3, exhaustive_blocks=0).decide(state(budget))
    assert state(budget).fits(beam)
    assert score(beam) <= score(GreedyPolicy().decide(state(budget)))


def test_every_policy_fits_or_says_why() -> None:
    rng = random.Random(0)
    policies: list[Policy] = [
        NonePolicy(),
        StaticPolicy(0.5),
        GreedyPolicy(),
        SearchPolicy(lambda p: -p.kept_blocks, exhaustive_blocks=0),
    ]
    for _ in range(40):
        batch, seq = rng.choice([1, 4, 16]), rng.choice([8, 64, 256])
        budget = int(dense_bytes(batch, seq) * rng.uniform(0.05, 1.1))
        for policy in policies:
            try:
                plan = policy.decide(state(budget, batch, seq))
            except NoFeasiblePlan as error:
                assert "budget is" in str(error)
            else:
                assert state(budget, batch, seq).fits(plan), (policy.name, budget)


def test_nothing_fits_a_tiny_budget() -> None:
    for policy in (GreedyPolicy(), SearchPolicy(lambda p: 0.0)):
        with pytest.raises(NoFeasiblePlan, match="budget is 10 bytes"):
            policy.decide(state(10))


def test_make_policy_and_state_validation() -> None:
    assert make_policy("greedy").name == "greedy"
    assert make_policy("static", static_ratio=0.5).decide(state(dense_bytes())).kept_blocks == 4
    with pytest.raises(ValueError, match="needs a score function"):
        make_policy("search")
    with pytest.raises(ValueError, match="unknown policy 'dqn'"):
        make_policy("dqn")
    with pytest.raises(ValueError, match="budget must be positive"):
        state(0)


def test_registry_builds_every_policy_it_names() -> None:
    """Each name builds a policy that answers to that name, with what it needs."""
    for name in POLICIES:
        built = make_policy(name, score=lambda plan: float(plan.kept_blocks))
        assert built.name == name
    assert set(SERVING_POLICIES) == {"rl", "greedy", "static", "none"}
    assert "search" in POLICIES and "search" not in SERVING_POLICIES  # needs measurements
    assert ADAPTIVE_POLICIES == ("rl", "greedy")


def test_adaptive_policies_follow_the_budget_and_the_others_do_not() -> None:
    """What `adaptive` claims: a squeeze changes an adaptive policy's plan."""
    roomy, tight = state(dense_bytes()), state(int(dense_bytes() * 0.7))
    for name, entry in REGISTRY.items():
        if name == "rl":
            continue  # trained for SmolLM2's 60 blocks; tests/agent/test_rl.py covers it
        policy = make_policy(name, static_ratio=0.5, score=lambda plan: -float(plan.kept_blocks))
        try:
            follows = policy.decide(roomy) != policy.decide(tight)
        except NoFeasiblePlan:
            follows = False
        assert follows == entry.adaptive, name
