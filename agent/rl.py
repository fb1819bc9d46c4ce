"""The RAP agent: a small DQN that picks which block to drop next.

State (as in RAP): the memory budget, batch size, sequence length and the
KV-cache share of memory, plus the current keep-mask. Action: drop one more
block. An episode starts from the dense model and ends when the plan fits
the budget or when only one block is left and it still does not fit (a fixed
penalty). Each drop is rewarded with minus the log-perplexity it added, so an
episode's return is minus the plan's total log-perplexity increase. The Q-network is
an MLP of about 17K parameters for SmolLM2's 60 blocks.

Serving needs only torch and this module: `RLPolicy.load` reads the
network from a safetensors checkpoint. Training (`train_agent`) adds a
replay buffer, a target network and epsilon-greedy exploration; the quality
of a plan comes from a callable, either measured perplexity or the profile's
additive estimate (`ProfileQuality`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from elasticfleet.agent.policy import PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.worker.memory import predict_memory
from elasticfleet.worker.plan import PruningPlan

#: The committed agent for the shipped model, next to its profile.
DEFAULT_AGENT = DEFAULT_PROFILE.with_suffix(".agent.safetensors")
LOAD_FEATURES = 5  # budget, need, batch, sequence, KV share
# Below any reachable plan's cost (log-perplexity increases stay under ~30), so that
# running out of blocks is never preferred to a bad plan that fits.
FAIL_PENALTY = -100.0


def encode_state(state: PolicyState, plan: PruningPlan) -> torch.Tensor:
    """The network's input for `plan` under `state`: load features, then the keep-mask."""
    config = state.profile.config
    dense = predict_memory(config, None, state.batch_size, state.seq_len, state.profile.dtype)
    load = [
        state.budget_bytes / dense.total_bytes,  # how hard the budget squeezes
        state.predicted_bytes(plan) / state.budget_bytes,  # how far this plan is from fitting
        math.log2(state.batch_size) / 8,
        math.log2(state.seq_len) / 16,
        dense.kv_bytes / dense.total_bytes,  # RAP's KV-cache ratio
    ]
    mask = [1.0 if keep else 0.0 for keep in plan.to_mask()]
    return torch.tensor(load + mask, dtype=torch.float32)


class QNetwork(nn.Module):
    """Q-value of dropping each block, from the encoded state."""

    def __init__(self, num_blocks: int, hidden: int = 80) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.hidden = hidden
        self.layers = nn.Sequential(
            nn.Linear(LOAD_FEATURES + num_blocks, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_blocks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        q: torch.Tensor = self.layers(features)
        return q  # [..., num_blocks]


def legal_actions(plan: PruningPlan) -> torch.Tensor:
    """Blocks that may be dropped next: kept ones, unless only one is left."""
    mask = torch.tensor(plan.to_mask())
    return mask if int(mask.sum()) > 1 else torch.zeros_like(mask)


def choose(network: QNetwork, features: torch.Tensor, legal: torch.Tensor) -> int:
    """The legal action with the highest Q-value."""
    with torch.no_grad():
        q = network(features)
    return int(q.masked_fill(~legal, float("-inf")).argmax())


def drop_block(plan: PruningPlan, block: int) -> PruningPlan:
    mask = plan.to_mask()
    mask[block] = False
    return PruningPlan.from_mask(mask)


@dataclass
class RLPolicy:
    """Serves a trained Q-network: drop the best-valued block until the plan fits."""

    network: QNetwork
    name: str = "rl"

    def decide(self, state: PolicyState) -> PruningPlan:
        if self.network.num_blocks != state.profile.num_blocks:
            raise ValueError(
                f"the agent was trained for {self.network.num_blocks} blocks, "
                f"the model has {state.profile.num_blocks}"
            )
        plan = PruningPlan.dense(state.profile.config.num_hidden_layers)
        while not state.fits(plan):
            legal = legal_actions(plan)
            if not bool(legal.any()):
                raise state.infeasible(self.name, plan, "even one kept block does not fit")
            plan = drop_block(plan, choose(self.network, encode_state(state, plan), legal))
        return plan

    def save(self, path: str | Path, meta: dict[str, object] | None = None) -> None:
        """Weights as safetensors; shapes and training facts in its metadata."""
        info = {"num_blocks": self.network.num_blocks, "hidden": self.network.hidden}
        metadata = {"agent": json.dumps(info), "meta": json.dumps(meta or {}, sort_keys=True)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> RLPolicy:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "agent" not in metadata:
            raise ValueError(f"{path}: not an elasticfleet RL checkpoint (no agent metadata)")
        info = json.loads(metadata["agent"])
        network = QNetwork(int(info["num_blocks"]), int(info["hidden"]))
        network.load_state_dict(load_file(str(path)))
        network.eval()
        return cls(network)


class ProfileQuality:
    """A cheap quality estimate from the profile, for training without
    running the model.

    GSI measured the perplexity of each prefix of its removal order, and
    those prefixes are the best plans we know of each size (on SmolLM2 the
    29-block prefix beats plans half its size chosen block by block). So a
    plan is scored as the shortest measured prefix that contains its latest-
    ranked dropped block: blocks early in the order are nearly free, a late
    one costs what its prefix cost. Blocks GSI did not reach cost a further
    factor e per rank beyond the last measured prefix.
    """

    def __init__(self, profile: ModelProfile) -> None:
        self.rank = {block: i for i, block in enumerate(profile.importance_rank())}
        self.dense = profile.dense_perplexity
        self.prefix = profile.gsi_perplexity

    def __call__(self, plan: PruningPlan) -> float:
        ranks = [self.rank[b] for b, keep in enumerate(plan.to_mask()) if not keep]
        if not ranks:
            return self.dense
        deepest = max(ranks)
        if deepest < len(self.prefix):
            return self.prefix[deepest]
        last = self.prefix[-1] if self.prefix else self.dense
        return last * math.exp(deepest - len(self.prefix) + 1)


@dataclass(frozen=True)
class TrainingConfig:
    """DQN settings; the defaults train the SmolLM2 agent."""

    episodes: int = 2000
    time_limit_s: float | None = None
    seed: int = 0
    hidden: int = 80
    learning_rate: float = 1e-3
    batch_size: int = 64
    replay: int = 20_000
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    target_every: int = 200  # gradient steps between target-network syncs
    batches: Sequence[int] = (1, 2, 4, 8, 16)
    seq_range: tuple[int, int] = (256, 4096)
    budget_range: tuple[float, float] = (0.45, 0.95)


@dataclass(frozen=True)
class Transition:
    features: torch.Tensor
    action: int
    reward: float
    next_features: torch.Tensor
    next_legal: torch.Tensor
    done: bool


def random_state(profile: ModelProfile, config: TrainingConfig, rng: random.Random) -> PolicyState:
    """A training scenario: batch, log-uniform sequence length, budget share."""
    batch = rng.choice(list(config.batches))
    low, high = config.seq_range
    seq = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    dense = predict_memory(profile.config, None, batch, seq, profile.dtype).total_bytes
    budget = int(dense * rng.uniform(*config.budget_range))
    return PolicyState(budget_bytes=budget, batch_size=batch, seq_len=seq, profile=profile)


def train_agent(
    profile: ModelProfile,
    quality: Callable[[PruningPlan], float],
    config: TrainingConfig = TrainingConfig(),
    *,
    progress: bool = True,
) -> tuple[RLPolicy, dict[str, float]]:
    """Train a Q-network on random scenarios; returns the policy and statistics."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    blocks = profile.num_blocks
    network = QNetwork(blocks, config.hidden)
    target = QNetwork(blocks, config.hidden)
    target.load_state_dict(network.state_dict())
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    memory: deque[Transition] = deque(maxlen=config.replay)
    log_dense = math.log(quality(PruningPlan.dense(profile.config.num_hidden_layers)))
    started = time.perf_counter()
    steps = 0
    rewards: deque[float] = deque(maxlen=200)
    bar = tqdm(range(config.episodes), desc="training", unit="episode", disable=not progress)
    episodes = 0
    for episode in bar:
        if config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s:
            break
        epsilon = config.epsilon_end + (config.epsilon_start - config.epsilon_end) * max(
            0.0, 1 - episode / (0.7 * config.episodes)
        )
        state = random_state(profile, config, rng)
        plan = PruningPlan.dense(profile.config.num_hidden_layers)
        log_previous = log_dense
        total = 0.0
        while not state.fits(plan):
            features, legal = encode_state(state, plan), legal_actions(plan)
            if rng.random() < epsilon:
                action = rng.choice([b for b, ok in enumerate(legal.tolist()) if ok])
            else:
                action = choose(network, features, legal)
            plan = drop_block(plan, action)
            next_legal = legal_actions(plan)
            done = state.fits(plan) or not bool(next_legal.any())
            # Each drop is charged the log-perplexity it adds, so credit lands on
            # the step that caused it; the sum over an episode is the plan's total.
            log_quality = math.log(quality(plan))
            reward = log_previous - log_quality
            log_previous = log_quality
            if done and not state.fits(plan):
                reward += FAIL_PENALTY
            memory.append(
                Transition(features, action, reward, encode_state(state, plan), next_legal, done)
            )
            total += reward
            if len(memory) >= config.batch_size:
                _learn(network, target, optimiser, rng.sample(list(memory), config.batch_size))
                steps += 1
                if steps % config.target_every == 0:
                    target.load_state_dict(network.state_dict())
            if done:
                break
        rewards.append(total)
        episodes = episode + 1
        bar.set_postfix(reward=f"{sum(rewards) / len(rewards):.3f}", eps=f"{epsilon:.2f}")
    network.eval()
    stats = {
        "episodes": float(episodes),
        "gradient_steps": float(steps),
        "seconds": time.perf_counter() - started,
        "mean_reward_last_200": sum(rewards) / max(len(rewards), 1),
    }
    return RLPolicy(network), stats


def _learn(
    network: QNetwork,
    target: QNetwork,
    optimiser: torch.optim.Optimizer,
    batch: Sequence[Transition],
) -> None:
    """One Double-DQN step: the online network picks the next action, the
    target network values it; episodes are undiscounted."""
    features = torch.stack([t.features for t in batch])
    actions = torch.tensor([t.action for t in batch])
    rewards = torch.tensor([t.reward for t in batch])
    following = torch.stack([t.next_features for t in batch])
    legal = torch.stack([t.next_legal for t in batch])
    done = torch.tensor([t.done for t in batch])
    with torch.no_grad():
        best = network(following).masked_fill(~legal, float("-inf")).argmax(-1)
        value = target(following).gather(1, best[:, None])[:, 0]
        goal = rewards + torch.where(done, torch.zeros_like(value), value)
    predicted = network(features).gather(1, actions[:, None])[:, 0]
    loss = F.smooth_l1_loss(predicted, goal)
    optimiser.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimiser.step()
