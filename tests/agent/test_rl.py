"""The RAP DQN agent on the tiny model's synthetic profile, and the committed
SmolLM2 agent served by numpy deciding as the torch network it was trained as."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_policy import PROFILE, dense_bytes, state

from elasticfleet.agent.policy import GreedyPolicy, NoFeasiblePlan, PolicyState, SearchPolicy
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.agent.registry import make_policy
from elasticfleet.agent.rl.policy import (
    BLOCK_FEATURES,
    DEFAULT_AGENT,
    LOAD_FEATURES,
    RATIO_CAP,
    FoldedNetwork,
    ProfileTables,
    RLPolicy,
    StateEncoder,
    encode_state,
    parameter_shapes,
)
from elasticfleet.agent.rl.training import (
    RAP_SCENARIOS,
    QNetwork,
    TrainingConfig,
    choose,
    features_tensors,
    one_thread,
    train_agent,
    trained_policy,
)
from elasticfleet.worker.model.memory import predict_memory
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


def test_the_serving_half_names_the_trainable_networks_parameters() -> None:
    """A checkpoint is QNetwork's state dict; the serving half reads it by
    `parameter_shapes`, so the two must agree."""
    network = QNetwork(60, hidden=16, block_hidden=8)
    shapes = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    assert shapes == parameter_shapes(60, 16, 8)


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
    folded = FoldedNetwork.of(trained_policy(network).network)
    for current in scenarios(5, seed=6):
        features = encode_state(current, PruningPlan.without_blocks(4, [7]))
        with torch.no_grad():
            expected = network(*features_tensors(features)) - network.value.bias
        assert np.allclose(folded.scores(*features), expected.numpy(), atol=1e-5)


def torch_decision(network: QNetwork, current: PolicyState) -> PruningPlan:
    """What the torch network decides for `current`: the training half's
    greedy step (`choose`, the full forward pass) until the plan fits."""
    episode = StateEncoder(current, ProfileTables.of(current.profile))
    while not episode.fits:
        if episode.stuck:
            raise current.infeasible("rl", episode.plan(), "even one kept block does not fit")
        legal = torch.from_numpy(episode.legal())
        episode.drop(choose(network, features_tensors(episode.encode()), legal))
    return episode.plan()


def committed_agent_states(profile: ModelProfile) -> list[PolicyState]:
    """RAP's ten scenarios at budgets from 95% to 30% of their dense bytes,
    then random loads and budgets (some too small for any plan)."""
    rng = random.Random(7)
    loads = [(*load, fraction) for load in RAP_SCENARIOS for fraction in np.linspace(0.95, 0.3, 8)]
    for _ in range(200):
        batch, seq = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 32, 64]), rng.randint(16, 8192)
        loads.append((batch, seq, rng.uniform(0.2, 1.05)))
    states = []
    for batch, seq, fraction in loads:
        dense = predict_memory(profile.config, None, batch, seq, profile.dtype).total_bytes
        states.append(PolicyState(int(dense * fraction), batch, seq, profile))
    return states


# A state where two blocks tie in float32 under torch's summation order
# (attention blocks 12 and 36, q = -2.335741 for both; torch's argmax takes
# the first) and numpy's order puts block 12 one ulp lower, so the two drop
# them in another order (the only step of 118,846 over 5,000 random states
# where they differ): the plan is the same. Numpy's is the reference.
TIE = (1_303_832_715, 24, 5164)


def test_the_committed_agent_decides_as_the_torch_network_it_was_trained_as() -> None:
    """The numpy policy and the torch QNetwork, loaded from the committed
    checkpoint, choose the same plan (or both find none) in every state."""
    profile = ModelProfile.load(DEFAULT_PROFILE)
    served = RLPolicy.load(DEFAULT_AGENT)
    network = QNetwork(60)
    network.load_state_dict(load_file(str(DEFAULT_AGENT)))
    decided = 0
    for current in [PolicyState(*TIE, profile), *committed_agent_states(profile)]:
        try:
            expected = torch_decision(network, current)
        except NoFeasiblePlan as error:
            with pytest.raises(NoFeasiblePlan) as refused:
                served.decide(current)
            assert str(refused.value) == str(error)
            continue
        assert served.decide(current) == expected, (current.batch_size, current.seq_len)
        decided += 1
    assert decided >= 250


def test_training_runs_on_one_thread_and_restores_the_setting() -> None:
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
    untrained = trained_policy(QNetwork(8))
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


def test_the_committed_agent_saves_back_as_it_was_written(tmp_path: Path) -> None:
    """Checkpoints are written by numpy now and were by torch: the same
    header (safetensors orders the metadata as a hash map does, so it is
    compared parsed) and byte for byte the same tensors."""
    from safetensors import safe_open

    def parts(path: Path) -> tuple[dict[str, object], bytes]:
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size]), data[8 + size :]

    with safe_open(str(DEFAULT_AGENT), framework="numpy") as handle:
        meta = json.loads((handle.metadata() or {})["meta"])
    RLPolicy.load(DEFAULT_AGENT).save(tmp_path / "agent.safetensors", meta=meta)
    assert parts(tmp_path / "agent.safetensors") == parts(DEFAULT_AGENT)


def test_bad_checkpoints_and_mismatched_models(trained: RLPolicy, tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an elasticfleet RL checkpoint"):
        RLPolicy.load(tmp_path / "other.safetensors")
    trained_policy(QNetwork(8)).save(tmp_path / "old.safetensors")
    tensors = load_file(str(tmp_path / "old.safetensors"))

    def checkpoint(name: str, info: dict[str, int], **changed: torch.Tensor | None) -> Path:
        """The 8-block network's tensors (some `changed`, None: left out) under `info`."""
        kept = {k: v for k, v in {**tensors, **changed}.items() if v is not None}
        save_file(kept, str(tmp_path / name), {"agent": json.dumps(info)})
        return tmp_path / name

    sizes = {"num_blocks": 8, "hidden": 128, "block_hidden": 32}
    with pytest.raises(ValueError, match=r"features version 1.*retrain"):
        RLPolicy.load(checkpoint("v1.safetensors", {"num_blocks": 8, "hidden": 128}))
    # Tensors that are not the network the metadata names are refused at load.
    wrong = checkpoint("wrong.safetensors", {**sizes, "num_blocks": 9, "features": 2})
    with pytest.raises(ValueError, match=r"context_in.weight is float32 \[128, 15\].*\[128, 16\]"):
        RLPolicy.load(wrong)
    missing = checkpoint("missing.safetensors", {**sizes, "features": 2}, **{"pool.weight": None})
    with pytest.raises(ValueError, match=r"not the network's: pool\.weight"):
        RLPolicy.load(missing)
    double = tensors["mix.bias"].double()
    halved = checkpoint("double.safetensors", {**sizes, "features": 2}, **{"mix.bias": double})
    with pytest.raises(ValueError, match=r"mix.bias is float64 \[32\]"):
        RLPolicy.load(halved)
    bigger = trained_policy(QNetwork(12))
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
