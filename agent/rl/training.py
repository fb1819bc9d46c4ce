"""The RAP agent's training half: a Double DQN over random load scenarios.

An episode starts from the dense model and ends when the plan fits the
budget or when no step down the ladder is left and it still does not fit (a
fixed penalty). Each step is rewarded with minus the log-perplexity it added
(capped at 20x dense), and a drop less a small share of the block's own
measured GSI step as a tie-break, so an episode's return is minus the
plan's total cost.

`train_agent` adds to the serving half (`elasticfleet.agent.rl.policy`) the
trainable network (`QNetwork`, a torch module), a replay buffer, a target
network, epsilon-greedy exploration, a curriculum from loose to tight budgets
and Double-DQN targets; the quality of a plan comes from a callable, either
measured perplexity or the profile's estimate (`ProfileQuality`). The serving
half computes with numpy; this module is where torch is, so the conversions
live here: the encoder's features enter the network through
`torch.from_numpy`, and a trained network leaves as the serving half's
`NetworkWeights` (`trained_policy`). The operator never loads this module.

The committed agents are reproduced by `elasticfleet agent train --seed 0`
(`DEFAULT_AGENT`, the full ladder) and `elasticfleet agent train --seed 0
--pruning-only` (`PRUNING_AGENT`), with the `TrainingConfig` defaults.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from elasticfleet.agent.policy import PolicyState
from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.rl.policy import (
    ACTION_FEATURES,
    Floats,
    LadderEpisode,
    LadderTables,
    NetworkWeights,
    RLPolicy,
    context_width,
)
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

# Below any reachable plan's cost (log-perplexity increases stay under ~30), so that
# running out of blocks is never preferred to a bad plan that fits.
FAIL_PENALTY = -100.0

#: RAP's ten (batch, sequence) scenarios, which the benchmark uses too.
RAP_SCENARIOS: tuple[tuple[int, int], ...] = (
    (1, 4096), (2, 2048), (4, 2048), (4, 4096), (8, 1024),
    (8, 2048), (8, 4096), (16, 512), (16, 1024), (16, 2048),
)  # fmt: skip


class QNetwork(nn.Module):
    """The trainable Q-network: the layers `parameter_shapes` names (the
    serving half's docstring says what each does), as torch modules. Its
    state dict is what a checkpoint holds."""

    def __init__(self, num_blocks: int, hidden: int = 128, block_hidden: int = 32) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.hidden = hidden
        self.block_hidden = block_hidden
        self.context_in = nn.Linear(context_width(num_blocks), hidden)
        self.context_out = nn.Linear(hidden, block_hidden)
        self.action = nn.Linear(ACTION_FEATURES, block_hidden)
        self.mix = nn.Linear(block_hidden, block_hidden)
        self.pool = nn.Linear(block_hidden, block_hidden, bias=False)
        self.value = nn.Linear(block_hidden, 1)

    def forward(self, load: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        # Functional calls: an episode makes ~100 of these, module dispatch adds up.
        # load [..., context_width(N)], actions [..., A, ACTION_FEATURES]
        context = F.relu(F.linear(load, self.context_in.weight, self.context_in.bias))
        context = F.linear(context, self.context_out.weight, self.context_out.bias)  # [..., Hb]
        z = F.linear(actions, self.action.weight, self.action.bias)  # [..., A, Hb]
        z = F.relu(z + context.unsqueeze(-2))
        # What the other actions offer (e.g. the cheapest one that would make
        # the plan fit) matters to each action's value: max-pool over actions.
        pooled = F.linear(z.amax(dim=-2), self.pool.weight)  # [..., Hb]
        z = F.linear(z, self.mix.weight, self.mix.bias) + pooled.unsqueeze(-2)
        z = F.relu(z)  # [..., A, Hb]
        q = F.linear(z, self.value.weight, self.value.bias)  # [..., A, 1]
        return q.squeeze(-1)  # [..., A]


def trained_policy(network: QNetwork, pruning_only: bool = False) -> RLPolicy:
    """The serving half's policy for `network` (trained on the keep/drop
    ladder if `pruning_only`): its parameters as float32 numpy arrays
    (copies: training may go on)."""
    tensors = {name: t.detach().numpy().copy() for name, t in network.state_dict().items()}
    weights = NetworkWeights(network.num_blocks, network.hidden, network.block_hidden, tensors)
    return RLPolicy(weights, pruning_only=pruning_only)


def features_tensors(features: tuple[Floats, Floats]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (load, actions) as tensors sharing their memory."""
    load, actions = features
    return torch.from_numpy(load), torch.from_numpy(actions)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread for a while. The agent's matrices are tiny: on
    one thread a step takes microseconds, while a thread pool on busy cores can
    stall each step for milliseconds waiting for a descheduled helper."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def choose(
    network: QNetwork, features: tuple[torch.Tensor, torch.Tensor], legal: torch.Tensor
) -> int:
    """The legal action with the highest Q-value."""
    with torch.inference_mode():
        q = network(*features)
    return int(q.masked_fill(~legal, float("-inf")).argmax())


@dataclass(frozen=True)
class TrainingConfig:
    """DQN settings; the defaults train the SmolLM2 agent."""

    episodes: int = 3000
    time_limit_s: float | None = None
    seed: int = 0
    hidden: int = 128
    block_hidden: int = 32
    learning_rate: float = 1e-3
    learning_rate_end: float = 5e-5  # cosine decay over the episodes
    batch_size: int = 64
    replay: int = 20_000
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay: float = 0.5  # share of the episodes over which epsilon falls
    target_every: int = 250  # gradient steps between target-network syncs
    n_step: int = 1  # rewards summed before bootstrapping from the target network
    # Each dropped block also costs this share of its own measured GSI step, so
    # that among plans the estimate scores alike (it only sees the deepest
    # dropped block) the agent keeps the blocks that mattered most.
    tie_break: float = 0.1
    # Log-perplexity increases are capped here (e^3: 20x the dense perplexity):
    # past that a plan is useless however bad, the estimate is extrapolated,
    # and uncapped costs (up to ~20) would swamp the differences that matter.
    cost_cap: float = 3.0
    batches: Sequence[int] = (1, 2, 4, 8, 16)
    seq_range: tuple[int, int] = (256, 4096)
    budget_range: tuple[float, float] = (0.35, 0.95)
    # Serving dtypes drawn from: the share of bytes a precision step frees
    # depends on it (int8 halves a bf16 block, quarters an fp32 one).
    dtypes: Sequence[str] = ("float32", "bfloat16")
    # Curriculum: the lowest budget share starts here and falls linearly to
    # budget_range[0] over this share of the episodes (short episodes first).
    curriculum_start: float = 0.85
    curriculum: float = 0.4
    rap_share: float = 0.5  # episodes drawn from RAP's ten (batch, sequence) scenarios
    # Environment steps per gradient step: full-ladder episodes are ~100
    # steps long, and a gradient step (a batch of 64 states of 90 actions)
    # costs milliseconds here, an environment step a fraction of one.
    learn_every: int = 4
    # Train for the keep/drop ladder only (the precision benchmark's baseline).
    pruning_only: bool = False


def random_state(
    profile: ModelProfile, config: TrainingConfig, rng: random.Random, progress: float = 1.0
) -> PolicyState:
    """A training scenario: one of RAP's (batch, sequence) pairs or a random
    batch with a log-uniform sequence length, at a uniform budget share whose
    lower end follows the curriculum at `progress` (share of training done)."""
    if rng.random() < config.rap_share:
        batch, seq = rng.choice(RAP_SCENARIOS)
    else:
        batch = rng.choice(list(config.batches))
        low, high = config.seq_range
        seq = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    dtype = rng.choice(list(config.dtypes))
    dense = predict_memory(profile.config, None, batch, seq, dtype).total_bytes
    lowest, highest = config.budget_range
    if config.curriculum > 0:
        done = min(1.0, progress / config.curriculum)
        start = config.curriculum_start
        lowest = max(lowest, start + (lowest - start) * done)
    budget = int(dense * rng.uniform(lowest, highest))
    return PolicyState(budget, batch, seq, profile, dtype=dtype)


class ReplayBuffer:
    """A ring of n-step transitions held in preallocated tensors."""

    def __init__(self, capacity: int, blocks: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.cursor = 0
        actions = blocks + blocks // 2
        self.load = torch.zeros(capacity, context_width(blocks))
        self.actions = torch.zeros(capacity, actions, ACTION_FEATURES)
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.reward = torch.zeros(capacity)
        self.next_load = torch.zeros(capacity, context_width(blocks))
        self.next_actions = torch.zeros(capacity, actions, ACTION_FEATURES)
        self.next_legal = torch.zeros(capacity, actions, dtype=torch.bool)
        self.done = torch.zeros(capacity, dtype=torch.bool)

    def add(
        self,
        features: tuple[torch.Tensor, torch.Tensor],
        action: int,
        reward: float,
        following: tuple[torch.Tensor, torch.Tensor],
        next_legal: torch.Tensor,
        done: bool,
    ) -> None:
        i = self.cursor
        self.load[i], self.actions[i] = features
        self.action[i], self.reward[i] = action, reward
        self.next_load[i], self.next_actions[i] = following
        self.next_legal[i], self.done[i] = next_legal, done
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.size, (count,), generator=generator)


@dataclass
class _Step:
    features: tuple[torch.Tensor, torch.Tensor]
    action: int
    reward: float
    following: tuple[torch.Tensor, torch.Tensor]
    next_legal: torch.Tensor
    done: bool


def train_agent(
    profile: ModelProfile,
    quality: Callable[[PruningPlan], float],
    config: TrainingConfig = TrainingConfig(),
    *,
    progress: bool = True,
) -> tuple[RLPolicy, dict[str, float]]:
    """Train a Q-network on random scenarios; returns the policy and statistics.
    Runs on one thread (see `one_thread`)."""
    with one_thread():
        return _train(profile, quality, config, progress)


def _train(
    profile: ModelProfile,
    quality: Callable[[PruningPlan], float],
    config: TrainingConfig,
    progress: bool,
) -> tuple[RLPolicy, dict[str, float]]:
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    blocks = profile.num_blocks
    layers = profile.config.num_hidden_layers
    network = QNetwork(blocks, config.hidden, config.block_hidden)
    target = QNetwork(blocks, config.hidden, config.block_hidden)
    target.load_state_dict(network.state_dict())
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    memory = ReplayBuffer(config.replay, blocks)
    tables = LadderTables.of(profile, config.pruning_only)
    drop_cost = [config.tie_break * float(s) for s in tables.importance]
    last = len(tables.ladder) - 1
    log_dense = math.log(quality(PruningPlan.dense(layers)))
    started = time.perf_counter()
    steps = env_steps = 0
    rewards: list[float] = []
    bar = tqdm(range(config.episodes), desc="training", unit="episode", disable=not progress)
    episodes = 0
    for episode in bar:
        if config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s:
            break
        progress_share = episode / max(config.episodes, 1)
        epsilon = config.epsilon_end + (config.epsilon_start - config.epsilon_end) * max(
            0.0, 1 - progress_share / config.epsilon_decay
        )
        cosine = 0.5 * (1 + math.cos(math.pi * progress_share))
        for group in optimiser.param_groups:
            group["lr"] = config.learning_rate_end + cosine * (
                config.learning_rate - config.learning_rate_end
            )
        state = random_state(profile, config, rng, progress_share)
        episode_state = LadderEpisode(state, tables)
        features = features_tensors(episode_state.encode())
        log_previous = 0.0  # the estimate's log-perplexity increase so far, capped
        trajectory: list[_Step] = []
        while not episode_state.fits:
            legal = episode_state.legal()
            if rng.random() < epsilon:
                action = rng.choice(legal.nonzero()[0].tolist())
            else:
                action = choose(network, features, torch.from_numpy(legal.copy()))
            drops = action < blocks and episode_state.rung[action] == last - 1
            episode_state.take(action)
            following = features_tensors(episode_state.encode())
            next_legal = torch.from_numpy(episode_state.legal().copy())
            done = episode_state.fits or not bool(next_legal.any())
            # Each step is charged the log-perplexity it adds, so credit lands on
            # the step that caused it; the sum over an episode is the plan's total.
            increase = math.log(quality(episode_state.plan())) - log_dense
            log_quality = min(increase, config.cost_cap)
            reward = log_previous - log_quality - (drop_cost[action] if drops else 0.0)
            log_previous = log_quality
            if done and not episode_state.fits:
                reward += FAIL_PENALTY
            trajectory.append(_Step(features, action, reward, following, next_legal, done))
            features = following
            env_steps += 1
            if memory.size >= config.batch_size and env_steps % config.learn_every == 0:
                batch = memory.sample(config.batch_size, generator)
                _learn(network, target, optimiser, memory, batch)
                steps += 1
                if steps % config.target_every == 0:
                    target.load_state_dict(network.state_dict())
            if done:
                break
        _remember(memory, trajectory, config.n_step)
        rewards.append(sum(s.reward for s in trajectory))
        episodes = episode + 1
        recent = rewards[-200:]
        bar.set_postfix(reward=f"{sum(recent) / len(recent):.3f}", eps=f"{epsilon:.2f}")
    network.eval()
    recent = rewards[-200:]
    stats = {
        "episodes": float(episodes),
        "gradient_steps": float(steps),
        "seconds": time.perf_counter() - started,
        "mean_reward_last_200": sum(recent) / max(len(recent), 1),
    }
    return trained_policy(network, config.pruning_only), stats


def _remember(memory: ReplayBuffer, trajectory: Sequence[_Step], n_step: int) -> None:
    """Store an episode as n-step transitions: each step's reward plus the
    next n - 1, bootstrapping from the state n steps on unless it ended."""
    for t, first in enumerate(trajectory):
        last = trajectory[min(t + n_step, len(trajectory)) - 1]
        reward = sum(s.reward for s in trajectory[t : t + n_step])
        memory.add(first.features, first.action, reward, last.following, last.next_legal, last.done)


def _learn(
    network: QNetwork,
    target: QNetwork,
    optimiser: torch.optim.Optimizer,
    memory: ReplayBuffer,
    index: torch.Tensor,
) -> None:
    """One Double-DQN step: the online network picks the next action, the
    target network values it; episodes are undiscounted."""
    following = (memory.next_load[index], memory.next_actions[index])
    legal = memory.next_legal[index]
    done = memory.done[index]
    with torch.no_grad():
        best = network(*following).masked_fill(~legal, float("-inf")).argmax(-1)
        value = target(*following).gather(1, best[:, None])[:, 0]
        goal = memory.reward[index] + torch.where(done, torch.zeros_like(value), value)
    predicted = network(memory.load[index], memory.actions[index])
    predicted = predicted.gather(1, memory.action[index][:, None])[:, 0]
    loss = F.smooth_l1_loss(predicted, goal)
    optimiser.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    nn.utils.clip_grad_norm_(network.parameters(), 10.0)
    optimiser.step()
