"""The RAP DQN agent on the tiny model's synthetic profile."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_policy import PROFILE, dense_bytes, state

from elasticfleet.agent.policy import GreedyPolicy, NoFeasiblePlan, PolicyState, SearchPolicy
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.agent.registry import make_policy
from elasticfleet.agent.rl.policy import (
    BLOCK_FEATURES,
    LOAD_FEATURES,
    RATIO_CAP,
    FoldedNetwork,
    ProfileTables,
    QNetwork,
    RLPolicy,
    StateEncoder,
    encode_state,
    one_thread,
)
from elasticfleet.agent.rl.training import TrainingConfig, train_agent
from elasticfleet.worker.model.plan import PruningPlan

QUALITY = ProfileQuality(PROFILE)


@pytest.fixture(scope="module")
def trained() -> RLPolicy:
    config = TrainingConfig(episodes=600, seed=0, seq_range=(8, 512))
    policy, stats = train_agent(PROFILE, QUALITY, config, progress=False)
    assert stats["episodes"] == 600
    return policy


def scenarios(count: int, seed: int) -> list[PolicyState]:
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        batch, seq = rng.choice([1, 4, 16]), rng.choice([8, 64, 256])
        result.append(state(int(dense_bytes(batch, seq) * rng.uniform(0.4, 0.95)), batch, seq))
    return result


def test_network_size_matches_raps() -> None:
    network = QNetwork(num_blocks=60)
    assert 10_000 <= sum(p.numel() for p in network.parameters()) <= 20_000


def test_state_encoding() -> None:
    plan = PruningPlan.without_blocks(4, [3])
    current = state(dense_bytes(4, 64) // 2, 4, 64)
    load, blocks = encode_state(current, plan)
    assert load.shape == (LOAD_FEATURES + 8,)
    assert blocks.shape == (8, BLOCK_FEATURES)
    assert load[0].item() == pytest.approx(0.5, abs=1e-6)
    over = current.predicted_bytes(plan) - current.budget_bytes
    assert load[1].item() == pytest.approx(over / dense_bytes(4, 64))
    assert load[LOAD_FEATURES:].tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    assert blocks[:, 0].tolist() == [1, 1, 1, 0, 1, 1, 1, 1]  # kept
    assert blocks[:, 1].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]  # attention
    rank = PROFILE.importance_rank()  # 7, 5, 6, 3, then the proxy order
    assert blocks[rank, 3].tolist() == pytest.approx([i / 8 for i in range(8)])
    # Bytes freed by dropping block 6 alone, then with every kept block ranked
    # below it (7 and 5; 3 is already dropped), over the bytes still to free.
    ratio = min(current.block_savings(6) / over, RATIO_CAP) / RATIO_CAP
    assert blocks[6, 8].item() == pytest.approx(ratio, rel=1e-5)
    reach = sum(current.block_savings(b) for b in (7, 5, 6)) / over
    assert blocks[6, 9].item() == pytest.approx(min(reach, RATIO_CAP) / RATIO_CAP, rel=1e-5)
    for block in range(8):  # whether dropping it (alone / with lower-ranked kept ones) fits
        if block == 3:
            continue
        below = [b for b in rank[: rank.index(block) + 1] if b != 3]
        freed = sum(current.block_savings(b) for b in below)
        assert blocks[block, 10].item() == (current.block_savings(block) >= over)
        assert blocks[block, 11].item() == (freed >= over)
    assert 0 < blocks[:, 11].sum() < 7  # the bits do vary here
    # Block 3 (GSI rank 3) is the deepest dropped: dropping 7, 5 or 6 adds
    # nothing to the estimate, dropping anything ranked deeper does.
    assert blocks[[7, 5, 6], 7].tolist() == [0, 0, 0]
    assert (blocks[rank[4:], 7] > 0).all()


def test_encoder_tracks_the_memory_model() -> None:
    rng = random.Random(4)
    for current in scenarios(20, seed=4):
        encoder = StateEncoder(current, ProfileTables.of(PROFILE))
        order = list(range(8))
        rng.shuffle(order)
        for block in order[:-1]:
            encoder.drop(block)
            plan = encoder.plan()
            assert encoder.excess == current.predicted_bytes(plan) - current.budget_bytes
            assert encoder.fits == current.fits(plan)
        assert encoder.stuck == (not current.fits(encoder.plan()))
        with pytest.raises(ValueError, match="cannot be dropped"):
            encoder.drop(order[-1])


def test_folded_network_scores_like_the_network() -> None:
    torch.manual_seed(0)
    network = QNetwork(8)
    folded = FoldedNetwork.of(network)
    for current in scenarios(5, seed=6):
        load, blocks = encode_state(current, PruningPlan.without_blocks(4, [7]))
        with torch.no_grad():
            expected = network(load, blocks) - network.value.bias
        assert torch.allclose(folded.scores(load, blocks), expected, atol=1e-5)


def test_decisions_run_on_one_thread_and_restore_the_setting() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_profile_quality_follows_measured_gsi_prefixes() -> None:
    # PROFILE's GSI order is 7, 5, 6, 3 with perplexities 11, 13, 16, 20 (dense 10).
    assert QUALITY(PruningPlan.dense(4)) == pytest.approx(10.0)
    assert QUALITY(PruningPlan.without_blocks(4, [7])) == pytest.approx(11.0)
    assert QUALITY(PruningPlan.without_blocks(4, [7, 5])) == pytest.approx(13.0)
    assert QUALITY(PruningPlan.without_blocks(4, [5])) == pytest.approx(13.0)
    assert QUALITY(PruningPlan.without_blocks(4, [7, 5, 6, 3])) == pytest.approx(20.0)
    beyond = PROFILE.importance_rank()[4]  # the first block GSI did not reach
    assert QUALITY(PruningPlan.without_blocks(4, [beyond])) == pytest.approx(20.0 * math.e)


def test_trained_agent_beats_an_untrained_one_and_tracks_search(trained: RLPolicy) -> None:
    torch.manual_seed(5)
    untrained = RLPolicy(QNetwork(8))
    gaps: dict[str, list[float]] = {"trained": [], "untrained": [], "greedy": []}
    for current in scenarios(40, seed=1):
        try:
            best = math.log(QUALITY(SearchPolicy(QUALITY).decide(current)))
        except NoFeasiblePlan:
            continue
        gaps["trained"].append(math.log(QUALITY(trained.decide(current))) - best)
        gaps["untrained"].append(math.log(QUALITY(untrained.decide(current))) - best)
        gaps["greedy"].append(math.log(QUALITY(GreedyPolicy().decide(current))) - best)
    mean = {name: sum(values) / len(values) for name, values in gaps.items()}
    assert mean["trained"] < mean["untrained"] / 2
    optimal = sum(gap < 1e-9 for gap in gaps["trained"]) / len(gaps["trained"])
    assert optimal >= 0.6, (optimal, mean)


def test_decisions_fit_or_say_why(trained: RLPolicy) -> None:
    for current in scenarios(60, seed=2):
        try:
            plan = trained.decide(current)
        except NoFeasiblePlan as error:
            assert "rl policy" in str(error)
        else:
            assert current.fits(plan)
    with pytest.raises(NoFeasiblePlan, match="even one kept block does not fit"):
        trained.decide(state(10))


def test_checkpoint_round_trip(trained: RLPolicy, tmp_path: Path) -> None:
    path = tmp_path / "agent.safetensors"
    trained.save(path, meta={"episodes": 600})
    loaded = make_policy("rl", agent_path=path)
    for current in scenarios(20, seed=3):
        try:
            expected = trained.decide(current)
        except NoFeasiblePlan:
            continue
        assert loaded.decide(current) == expected


def test_bad_checkpoints_and_mismatched_models(trained: RLPolicy, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an elasticfleet RL checkpoint"):
        RLPolicy.load(tmp_path / "other.safetensors")
    old = RLPolicy(QNetwork(8))
    old.save(tmp_path / "old.safetensors")
    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata["agent"] = json.dumps({"num_blocks": 8, "hidden": 128})  # before features v2
    save_file(
        load_file(str(tmp_path / "old.safetensors")), str(tmp_path / "v1.safetensors"), metadata
    )
    with pytest.raises(ValueError, match=r"features version 1.*retrain"):
        RLPolicy.load(tmp_path / "v1.safetensors")
    bigger = RLPolicy(QNetwork(12))
    with pytest.raises(ValueError, match="trained for 12 blocks, the model has 8"):
        bigger.decide(state(dense_bytes()))


def test_agent_train_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from safetensors import safe_open

    from elasticfleet.cli import main

    PROFILE.save(tmp_path / "profile.json")
    out = tmp_path / "agent.safetensors"
    args = ["agent", "train", "--profile", str(tmp_path / "profile.json"), "--out", str(out)]
    assert main([*args, "--episodes", "20", "--seed", "3", "--no-progress"]) == 0
    assert RLPolicy.load(out).network.num_blocks == 8
    with safe_open(str(out), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["meta"])
    assert meta["episodes"] == 20
    assert meta["seed"] == 3
    assert meta["quality"] == "profile"
