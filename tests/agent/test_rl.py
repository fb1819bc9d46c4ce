"""The RAP DQN agent on the tiny model's synthetic profiles (keep/drop only,
and the full precision ladder), and the committed SmolLM2 agents served by
numpy deciding as the torch networks they were trained as."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_policy import PROFILE, dense_bytes, state

from elasticfleet.agent.policy import (
    GreedyPolicy,
    NoFeasiblePlan,
    PolicyState,
    SearchPolicy,
)
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.agent.registry import make_policy
from elasticfleet.agent.rl.policy import (
    ACTION_FEATURES,
    DEFAULT_AGENT,
    LOAD_FEATURES,
    PRUNING_AGENT,
    RATIO_CAP,
    FoldedNetwork,
    LadderEpisode,
    LadderTables,
    RLPolicy,
    context_width,
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
from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan

QUALITY = ProfileQuality(PROFILE)
# The tiny profile with level costs: int8 nearly free, int4 dear on the FFN
# blocks, int8 KV caches cheap but not free.
LADDER = dataclasses.replace(
    PROFILE,
    level_costs={INT8: (0.001, 0.002) * 4, INT4: (0.01, 0.2) * 4, "kv_int8": (0.0005,) * 4},
)
LADDER_QUALITY = ProfileQuality(LADDER)


@pytest.fixture(scope="module")
def trained() -> RLPolicy:
    config = TrainingConfig(episodes=600, seed=0, seq_range=(8, 512), learn_every=1)
    policy, stats = train_agent(PROFILE, QUALITY, config, progress=False)
    assert stats["episodes"] == 600
    return policy


@pytest.fixture(scope="module")
def trained_ladder() -> RLPolicy:
    config = TrainingConfig(episodes=800, seed=0, seq_range=(8, 512), learn_every=1)
    policy, _ = train_agent(LADDER, LADDER_QUALITY, config, progress=False)
    return policy


def scenarios(count: int, seed: int, profile: ModelProfile = PROFILE) -> list[PolicyState]:
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        batch, seq = rng.choice([1, 4, 16]), rng.choice([8, 64, 256])
        budget = int(dense_bytes(batch, seq) * rng.uniform(0.3, 0.95))
        result.append(PolicyState(budget, batch, seq, profile))
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


def encode_plan(state: PolicyState, plan: PruningPlan, tables: LadderTables) -> LadderEpisode:
    """The episode that reached `plan` under `state`: each KV cache stepped
    to its level, then each block to its own."""
    episode = LadderEpisode(state, tables)
    rungs = tables.ladder
    for layer, level in enumerate(plan.kv_levels()):
        if level == INT8 and plan.keep_attention[layer]:
            episode.take(episode.blocks + layer)
    for block, level in enumerate(plan.levels()):
        for _ in range(rungs.index(level)):
            episode.take(block)
    return episode


def test_state_encoding() -> None:
    """Features of a plan with block 3 dropped, block 0 at int8 and layer
    1's KV cache at int8, on the full ladder."""
    plan = PruningPlan.from_levels(
        [INT8, FULL, FULL, DROPPED, FULL, FULL, FULL, FULL], [FULL, INT8, FULL, FULL]
    )
    current = PolicyState(dense_bytes(4, 64) // 2, 4, 64, LADDER)
    episode = encode_plan(current, plan, LadderTables.of(LADDER))
    assert episode.plan() == plan
    load, actions = episode.encode()
    assert load.shape == (context_width(8),) == (LOAD_FEATURES + 8 + 4,)
    assert actions.shape == (12, ACTION_FEATURES)
    assert load[0].item() == pytest.approx(0.5, abs=1e-6)
    over = current.predicted_bytes(plan) - current.budget_bytes
    assert episode.excess == over
    assert load[1].item() == pytest.approx(over / dense_bytes(4, 64))
    assert load[6].item() == pytest.approx(math.log(LADDER_QUALITY(plan) / 10.0))
    # Each block's rung (full 0, int8 1/3, dropped 1), then each KV level.
    assert load[LOAD_FEATURES:].tolist() == pytest.approx([1 / 3, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0])
    assert actions[:, :3].tolist() == [[1, 0, 0], [0, 1, 0]] * 4 + [[0, 0, 1]] * 4
    legal = episode.legal()
    # Block 3 is dropped and layer 1's cache is int8 already: no step left for them.
    assert legal.tolist() == [True] * 3 + [False] + [True] * 5 + [False, True, True]
    # Block 0 steps from int8 to int4: the step costs the rung's difference.
    assert episode.cost[0] == pytest.approx(0.01 - 0.001)
    assert actions[0, 5] == pytest.approx(1 / 3)
    # Greedy's order: the cheapest legal action per byte has place 0, the
    # illegal ones sit at 1, and the features agree with the costs and bytes.
    efficiency = np.where(legal, episode.cost / np.maximum(episode.freed, 1), np.inf)
    order = np.argsort(efficiency, kind="stable")
    assert actions[order[0], 12] == 0
    assert (actions[~legal, 12] == 1).all()
    assert (np.diff(actions[order[: legal.sum()], 12]) > 0).all()
    reach = np.cumsum(np.where(legal, episode.freed, 0)[order])
    for place, action in enumerate(order[: legal.sum()]):
        ratio = min(reach[place] / over, RATIO_CAP) / RATIO_CAP
        assert actions[action, 11] == pytest.approx(ratio, rel=1e-5)
        assert actions[action, 15] == (reach[place] >= over)
        assert actions[action, 14] == (episode.freed[action] >= over)
    assert 0 < actions[legal, 15].sum() < legal.sum()  # the bits do vary here


@pytest.mark.parametrize("profile", [PROFILE, LADDER], ids=["pruning", "ladder"])
def test_episodes_track_the_memory_model_and_the_estimate(profile: ModelProfile) -> None:
    """Random legal steps: the bytes over budget are the memory model's, the
    estimate is ProfileQuality's, the features kept up step by step are the
    ones pricing every action afresh gives, illegal steps are refused, and an
    episode ends with a plan that fits or with no step left."""
    rng = random.Random(4)
    quality = ProfileQuality(profile)
    tables = LadderTables.of(profile)
    for current in scenarios(20, seed=4, profile=profile):
        episode = LadderEpisode(current, tables)
        while episode.legal().any():
            episode.take(rng.choice(np.flatnonzero(episode.legal()).tolist()))
            plan = episode.plan()
            assert episode.excess == current.predicted_bytes(plan) - current.budget_bytes
            assert episode.fits == current.fits(plan)
            assert episode.estimate == pytest.approx(math.log(quality(plan) / 10.0), abs=1e-12)
            features = episode.encode()[1]
            assert np.isfinite(features).all()
            # What a step updated in place is what pricing every open block afresh gives.
            fresh = copy.deepcopy(episode)
            fresh._price(np.flatnonzero(fresh.legal()[: fresh.blocks]))
            assert np.array_equal(fresh.encode()[1], features)
        assert plan.kept_blocks == 1
        with pytest.raises(ValueError, match="is not a step"):
            episode.take(int(np.flatnonzero(episode.rung < len(tables.ladder) - 1)[0]))
    with pytest.raises(ValueError, match="no action 12"):
        episode.take(12)


@pytest.mark.parametrize("profile", [PROFILE, LADDER], ids=["pruning", "ladder"])
def test_taking_the_first_in_greedys_order_is_greedy(profile: ModelProfile) -> None:
    """The place feature is greedy's order: always taking the action at
    place 0 makes greedy's plan, in every state."""
    tables = LadderTables.of(profile)
    for current in scenarios(60, seed=8, profile=profile):
        episode = LadderEpisode(current, tables)
        while not episode.fits and episode.legal().any():
            episode.take(int(episode.encode()[1][:, 12].argmin()))
        try:
            expected = GreedyPolicy().decide(current)
        except NoFeasiblePlan:
            assert not episode.fits
            continue
        assert episode.plan() == expected


def test_folded_network_scores_like_the_network() -> None:
    torch.manual_seed(0)
    network = QNetwork(8)
    folded = FoldedNetwork.of(trained_policy(network).network)
    plan = PruningPlan.from_levels([INT4] + [FULL] * 6 + [DROPPED])
    for current in scenarios(5, seed=6, profile=LADDER):
        features = encode_plan(current, plan, LadderTables.of(LADDER)).encode()
        with torch.no_grad():
            expected = network(*features_tensors(features)) - network.value.bias
        assert np.allclose(folded.scores(*features), expected.numpy(), atol=1e-5)


def torch_decision(network: QNetwork, current: PolicyState, pruning_only: bool) -> PruningPlan:
    """What the torch network decides for `current`: the training half's
    greedy step (`choose`, the full forward pass) until the plan fits."""
    episode = LadderEpisode(current, LadderTables.of(current.profile, pruning_only))
    while not episode.fits:
        legal = episode.legal()
        if not legal.any():
            raise current.infeasible("rl", episode.plan(), "even one kept block does not fit")
        episode.take(choose(network, features_tensors(episode.encode()), torch.from_numpy(legal)))
    return episode.plan()


def committed_agent_states(profile: ModelProfile) -> list[PolicyState]:
    """RAP's ten scenarios at budgets from 95% to 30% of their dense bytes,
    then random loads, dtypes and budgets (some too small for any plan)."""
    rng = random.Random(7)
    loads = [
        (*load, fraction, "float32")
        for load in RAP_SCENARIOS
        for fraction in np.linspace(0.95, 0.3, 8)
    ]
    for _ in range(150):
        batch, seq = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 32, 64]), rng.randint(16, 8192)
        loads.append((batch, seq, rng.uniform(0.2, 1.05), rng.choice(["float32", "bfloat16"])))
    states = []
    for batch, seq, fraction, dtype in loads:
        dense = predict_memory(profile.config, None, batch, seq, dtype).total_bytes
        states.append(PolicyState(int(dense * fraction), batch, seq, profile, dtype=dtype))
    return states


@pytest.mark.parametrize("path", [DEFAULT_AGENT, PRUNING_AGENT], ids=["ladder", "pruning"])
def test_the_committed_agents_decide_as_the_torch_networks_they_were_trained_as(
    path: Path,
) -> None:
    """The numpy policy and the torch QNetwork, loaded from a committed
    checkpoint, choose the same plan (or both find none) in every state."""
    profile = ModelProfile.load(DEFAULT_PROFILE)
    served = RLPolicy.load(path)
    network = QNetwork(60)
    network.load_state_dict(load_file(str(path)))
    decided = quantized = 0
    for current in committed_agent_states(profile):
        try:
            expected = torch_decision(network, current, served.pruning_only)
        except NoFeasiblePlan as error:
            with pytest.raises(NoFeasiblePlan) as refused:
                served.decide(current)
            assert str(refused.value) == str(error)
            continue
        plan = served.decide(current)
        assert plan == expected, (current.batch_size, current.seq_len)
        quantized += not plan.pruning_only
        decided += 1
    assert decided >= 150
    # The pruning-only agent never quantizes; the ladder agent does.
    assert (quantized == 0) == served.pruning_only, quantized


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


def gaps_to_search(
    agent: RLPolicy, profile: ModelProfile, count: int, seed: int
) -> dict[str, list[float]]:
    """Log-estimate of each policy's plan over search's, per feasible scenario."""
    quality = ProfileQuality(profile)
    torch.manual_seed(5)
    untrained = trained_policy(QNetwork(8))
    gaps: dict[str, list[float]] = {"trained": [], "untrained": [], "greedy": []}
    for current in scenarios(count, seed=seed, profile=profile):
        try:
            best = math.log(quality(SearchPolicy(quality).decide(current)))
        except NoFeasiblePlan:
            continue
        gaps["trained"].append(math.log(quality(agent.decide(current))) - best)
        gaps["untrained"].append(math.log(quality(untrained.decide(current))) - best)
        gaps["greedy"].append(math.log(quality(GreedyPolicy().decide(current))) - best)
    return gaps


def test_trained_agent_beats_an_untrained_one_and_tracks_search(trained: RLPolicy) -> None:
    gaps = gaps_to_search(trained, PROFILE, 40, seed=1)
    mean = {name: sum(values) / len(values) for name, values in gaps.items()}
    assert mean["trained"] < mean["untrained"] / 2
    optimal = sum(gap < 1e-9 for gap in gaps["trained"]) / len(gaps["trained"])
    assert optimal >= 0.6, (optimal, mean)


def test_an_agent_trained_on_the_ladder_quantizes_and_tracks_search(
    trained_ladder: RLPolicy,
) -> None:
    """On the full ladder the trained agent puts blocks and KV caches below
    full precision before it drops anything, and its plans score within 5%
    of search's in most scenarios, far closer than an untrained network's."""
    gaps = gaps_to_search(trained_ladder, LADDER, 40, seed=1)
    mean = {name: sum(values) / len(values) for name, values in gaps.items()}
    assert mean["trained"] < mean["untrained"] / 4, mean
    close = sum(gap <= math.log(1.05) for gap in gaps["trained"]) / len(gaps["trained"])
    assert close >= 0.8, (close, mean)
    squeeze = PolicyState(int(dense_bytes(16, 256) * 0.8), 16, 256, LADDER)
    counts = trained_ladder.decide(squeeze).level_counts()
    assert counts[DROPPED] == 0 and counts[INT8] + counts["kv_int8"] > 0, counts


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
    with pytest.raises(ValueError, match=r"features version 2.*retrain"):
        RLPolicy.load(checkpoint("v2.safetensors", {**sizes, "features": 2}))
    wrong = checkpoint("wrong.safetensors", {**sizes, "num_blocks": 10, "features": 3})
    with pytest.raises(ValueError, match=r"context_in.weight is float32 \[128, 19\].*\[128, 22\]"):
        RLPolicy.load(wrong)
    missing = checkpoint("missing.safetensors", {**sizes, "features": 3}, **{"pool.weight": None})
    with pytest.raises(ValueError, match=r"not the network's: pool\.weight"):
        RLPolicy.load(missing)
    double = tensors["mix.bias"].double()
    halved = checkpoint("double.safetensors", {**sizes, "features": 3}, **{"mix.bias": double})
    with pytest.raises(ValueError, match=r"mix.bias is float64 \[32\]"):
        RLPolicy.load(halved)
    bigger = trained_policy(QNetwork(12))
    with pytest.raises(ValueError, match="trained for 12 blocks, the model has 8"):
        bigger.decide(state(dense_bytes()))


@pytest.mark.parametrize("pruning_only", [False, True], ids=["ladder", "pruning"])
def test_agent_train_writes_a_loadable_checkpoint(tmp_path: Path, pruning_only: bool) -> None:
    from safetensors import safe_open

    from elasticfleet.cli import main

    LADDER.save(tmp_path / "profile.json")
    out = tmp_path / "agent.safetensors"
    args = ["agent", "train", "--profile", str(tmp_path / "profile.json"), "--out", str(out)]
    args += ["--episodes", "20", "--seed", "3", "--no-progress"]
    assert main([*args, "--pruning-only"] if pruning_only else args) == 0
    agent = RLPolicy.load(out)
    assert agent.network.num_blocks == 8
    assert agent.pruning_only == pruning_only
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata() or {}
    meta = json.loads(metadata["meta"])
    assert meta["episodes"] == 20
    assert meta["seed"] == 3
    assert meta["quality"] == "profile"
    assert json.loads(metadata["agent"])["ladder"] == ("pruning" if pruning_only else "precision")
    if pruning_only:  # it only drops, whatever the profile measured
        current = PolicyState(int(dense_bytes(16, 256) * 0.5), 16, 256, LADDER)
        assert agent.decide(current).pruning_only
