"""The RAP agent: a small DQN that picks which block to drop next.

State (as in RAP): the memory budget, batch size, sequence length and the
KV-cache share of memory, plus the current keep-mask. Action: drop one more
block. An episode starts from the dense model and ends when the plan fits
the budget or when only one block is left and it still does not fit (a fixed
penalty). Each drop is rewarded with minus the log-perplexity it added (capped
at 20x dense), less a small share of the block's own measured GSI step as a
tie-break, so an episode's return is minus the plan's total cost.

Besides RAP's load features the network sees, for every block, what the
profile says about it: its GSI rank and measured cost, whether it is an
attention block, how deep it is, the estimate's added cost if it were dropped
now, and the bytes dropping it frees at this load (alone, and together with
every kept block GSI ranks below it) relative to the bytes still to free, with
a bit for each saying whether that would make the plan fit. RAP's flat MLP has
to learn 2L block identities from its keep-mask alone (our first version did
that and never beat a fixed ratio); here one narrow MLP scores every block
from a context (load features and keep-mask) plus the block's features, with
one max-pool over blocks so each block's value can depend on what the others
offer (Q(s, a) = MLP(context(s), block(s, a), max over b of block(s, b))).
About 15K parameters for SmolLM2's 60 blocks (RAP's is about 18K).

Serving needs only torch and this module: `RLPolicy.load` reads the
network from a safetensors checkpoint. Training (`train_agent`) adds a
replay buffer, a target network, epsilon-greedy exploration, a curriculum
from loose to tight budgets and Double-DQN targets; the quality of a plan
comes from a callable, either measured perplexity or the profile's estimate
(`ProfileQuality`). Neither is called when deciding: the policy only reads
the profile. Decisions run on one thread (`one_thread`) with the network's
weights folded for single-state steps (`FoldedNetwork`).

The committed agent (`DEFAULT_AGENT`) is reproduced by
`elasticfleet agent train --episodes 2500 --seed 0` (the `TrainingConfig`
defaults otherwise).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from elasticfleet.agent.policy import PolicyState, block_importance
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

#: The committed agent for the shipped model, next to its profile.
DEFAULT_AGENT = DEFAULT_PROFILE.with_suffix(".agent.safetensors")
#: Per-state inputs before the keep-mask: budget, bytes still to free, batch,
#: sequence, KV share, share of blocks kept, estimated cost so far.
LOAD_FEATURES = 7
#: Per-block inputs: kept, attention, depth, GSI rank, cost if deepest
#: dropped, measured GSI step, bytes freed, added cost now, bytes freed / bytes
#: to free, bytes freed with every kept lower-ranked block / bytes to free,
#: and whether each of those two ratios reaches 1 (the drop alone, or with
#: every kept block ranked below it, would make the plan fit).
BLOCK_FEATURES = 12
#: Checkpoints record this; an agent trained on other features will not load.
FEATURES_VERSION = 2
# Below any reachable plan's cost (log-perplexity increases stay under ~30), so that
# running out of blocks is never preferred to a bad plan that fits.
FAIL_PENALTY = -100.0
COST_CAP = 3.0  # log-perplexity increases in features are clipped to +-this
RATIO_CAP = 4.0  # byte ratios are capped here, then divided by it

#: RAP's ten (batch, sequence) scenarios, which the benchmark uses too.
RAP_SCENARIOS: tuple[tuple[int, int], ...] = (
    (1, 4096), (2, 2048), (4, 2048), (4, 4096), (8, 1024),
    (8, 2048), (8, 4096), (16, 512), (16, 1024), (16, 2048),
)  # fmt: skip


@dataclass(frozen=True)
class ProfileTables:
    """What the features need from a profile, independent of the load."""

    rank: torch.Tensor  # [N] GSI rank of each block (0 = least important)
    by_rank: torch.Tensor  # [N] blocks in rank order
    cost: torch.Tensor  # [N] log(estimate / dense) if the block were the deepest dropped
    step: torch.Tensor  # [N] the log-perplexity GSI measured for removing the block
    static: torch.Tensor  # [N, 5] attention, depth, rank, cost, step (scaled)
    # [N, N]: row r is every block's added-cost feature once the deepest
    # dropped block has GSI rank r (a drop then updates it with one copy).
    added: torch.Tensor

    @classmethod
    def of(cls, profile: ModelProfile) -> ProfileTables:
        blocks = profile.num_blocks
        layers = profile.config.num_hidden_layers
        order = profile.importance_rank()
        rank = torch.empty(blocks, dtype=torch.long)
        rank[torch.tensor(order)] = torch.arange(blocks)
        quality = ProfileQuality(profile)
        dense = math.log(profile.dense_perplexity)
        cost = torch.tensor(
            [
                math.log(quality(PruningPlan.without_blocks(layers, [b]))) - dense
                for b in range(blocks)
            ],
            dtype=torch.float32,
        )
        step = torch.tensor(block_importance(profile), dtype=torch.float32)
        static = torch.stack(
            [
                torch.tensor([1.0 - b % 2 for b in range(blocks)]),
                torch.tensor([(b // 2) / max(layers - 1, 1) for b in range(blocks)]),
                rank.float() / blocks,
                cost.clamp(-COST_CAP, COST_CAP),
                (10 * step).clamp(max=2.0),
            ],
            dim=1,
        )
        costs = cost.tolist()
        added = torch.stack(
            [
                torch.where(rank > r, cost - costs[order[r]], 0.0).clamp(-COST_CAP, COST_CAP)
                for r in range(blocks)
            ]
        )
        return cls(rank, torch.tensor(order), cost, step, static, added)


class StateEncoder:
    """One decision as an episode: the plan so far (keep-mask, bytes over
    budget, deepest-ranked dropped block) and the network's inputs for it.
    Load-dependent figures are computed once per state; each drop updates the
    rest in place, so a step costs a handful of small tensor operations."""

    def __init__(self, state: PolicyState, tables: ProfileTables) -> None:
        profile = state.profile
        dense = predict_memory(profile.config, None, state.batch_size, state.seq_len, profile.dtype)
        blocks = profile.num_blocks
        self.tables = tables
        self.dense_bytes = dense.total_bytes
        self.savings_bytes = [state.block_savings(b) for b in range(blocks)]
        self.savings = torch.tensor(self.savings_bytes, dtype=torch.float32)
        self.ranked_savings = self.savings[tables.by_rank]
        total = float(dense.total_bytes)
        self._ranks = tables.rank.tolist()
        self._rank = tables.rank
        self._costs = tables.cost.tolist()
        #: Bytes the plan is over budget; it fits once this is <= 0.
        self.excess = dense.total_bytes - state.budget_bytes
        self.kept = [True] * blocks
        self.kept_count = blocks
        self.deepest = -1  # GSI rank of the deepest dropped block
        self.current = 0.0  # the estimate's log-perplexity increase so far
        self._keep_ranked = torch.ones(blocks)
        # -inf for dropped blocks, added to Q-values to mask them.
        self.dropped_mask = torch.zeros(blocks)
        self._load = torch.zeros(LOAD_FEATURES + blocks)
        self._load[:LOAD_FEATURES] = torch.tensor(
            [
                state.budget_bytes / total,  # how hard the budget squeezes
                max(self.excess, 0) / total,  # bytes still to free
                math.log2(state.batch_size) / 8,
                math.log2(state.seq_len) / 16,
                dense.kv_bytes / total,  # RAP's KV-cache ratio
                1.0,  # share of blocks kept
                0.0,  # estimated cost so far
            ]
        )
        self._load[LOAD_FEATURES:] = 1.0  # the keep-mask
        freed = (self.savings / total * blocks).clamp(max=RATIO_CAP) / RATIO_CAP
        self._blocks = torch.cat(
            [
                torch.ones(blocks, 1),  # kept
                tables.static,
                freed[:, None],
                tables.cost.clamp(-COST_CAP, COST_CAP)[:, None],  # added cost now
                torch.zeros(blocks, 4),  # byte ratios and fit bits, filled by encode
            ],
            dim=1,
        )

    @property
    def fits(self) -> bool:
        return self.excess <= 0

    @property
    def stuck(self) -> bool:
        """Over budget with one block left: nothing more may be dropped."""
        return self.kept_count <= 1 and not self.fits

    def legal(self) -> torch.Tensor:
        """Blocks that may be dropped next: kept ones, unless only one is left."""
        if self.kept_count <= 1:
            return torch.zeros(len(self.kept), dtype=torch.bool)
        return torch.tensor(self.kept)

    def plan(self) -> PruningPlan:
        return PruningPlan.from_mask(self.kept)

    def drop(self, block: int) -> None:
        if not self.kept[block] or self.kept_count <= 1:
            raise ValueError(f"block {block} cannot be dropped from {self.plan().describe()}")
        self.kept[block] = False
        self.kept_count -= 1
        self.excess -= self.savings_bytes[block]
        rank = self._ranks[block]
        self._keep_ranked[rank] = 0.0
        self.dropped_mask[block] = -math.inf
        self._blocks[block, 0] = 0.0
        self._load[LOAD_FEATURES + block] = 0.0
        if rank > self.deepest:
            self.deepest, self.current = rank, self._costs[block]
            self._blocks[:, 7] = self.tables.added[rank]

    def encode(self, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(load [LOAD_FEATURES + N], blocks [N, BLOCK_FEATURES]) for the plan
        so far; without `copy` they are views the next drop overwrites."""
        load = self._load  # scalar writes: cheaper than one indexed write
        load[1] = max(self.excess, 0) / self.dense_bytes  # bytes still to free
        load[5] = self.kept_count / len(self.kept)
        load[6] = min(self.current, COST_CAP)
        need = max(self.excess, 1) * RATIO_CAP
        reach = (self.ranked_savings * self._keep_ranked).cumsum(0).index_select(0, self._rank)
        ratios = (torch.stack([self.savings, reach], dim=1) / need).clamp_(max=1.0)
        self._blocks[:, 8:10] = ratios
        self._blocks[:, 10:] = ratios >= 1 / RATIO_CAP  # the ratio before capping is >= 1
        if copy:
            return self._load.clone(), self._blocks.clone()
        return self._load, self._blocks


def encode_state(state: PolicyState, plan: PruningPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's inputs for `plan` under `state`: (load features then the
    keep-mask, per-block features)."""
    encoder = StateEncoder(state, ProfileTables.of(state.profile))
    for block, keep in enumerate(plan.to_mask()):
        if not keep:
            encoder.drop(block)
    return encoder.encode()


class QNetwork(nn.Module):
    """Q-value of dropping each block. A context MLP reads the state (load
    features and keep-mask, one row); a narrow MLP shared by all blocks scores
    each block from that context plus the block's own features. The per-block
    part stays narrow so a decision step is a few tiny matrix products."""

    def __init__(self, num_blocks: int, hidden: int = 128, block_hidden: int = 32) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.hidden = hidden
        self.block_hidden = block_hidden
        self.context_in = nn.Linear(LOAD_FEATURES + num_blocks, hidden)
        self.context_out = nn.Linear(hidden, block_hidden)
        self.block = nn.Linear(BLOCK_FEATURES, block_hidden)
        self.mix = nn.Linear(block_hidden, block_hidden)
        self.pool = nn.Linear(block_hidden, block_hidden, bias=False)
        self.value = nn.Linear(block_hidden, 1)

    def forward(self, load: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        # Functional calls: a decision makes ~30 of these, module dispatch adds up.
        # load [..., LOAD_FEATURES + N], blocks [..., N, BLOCK_FEATURES]
        context = F.relu(F.linear(load, self.context_in.weight, self.context_in.bias))
        context = F.linear(context, self.context_out.weight, self.context_out.bias)  # [..., Hb]
        z = F.linear(blocks, self.block.weight, self.block.bias)  # [..., N, Hb]
        z = F.relu(z + context.unsqueeze(-2))
        # What the other blocks offer (e.g. the cheapest one that would make
        # the plan fit) matters to each block's value: max-pool over blocks.
        pooled = F.linear(z.amax(dim=-2), self.pool.weight)  # [..., Hb]
        z = F.linear(z, self.mix.weight, self.mix.bias) + pooled.unsqueeze(-2)
        z = F.relu(z)  # [..., N, Hb]
        q = F.linear(z, self.value.weight, self.value.bias)  # [..., N, 1]
        return q.squeeze(-1)  # [..., N]


@dataclass(frozen=True)
class FoldedNetwork:
    """A QNetwork's weights laid out for one decision step: biases folded
    where they can be, matrices pre-transposed, no module dispatch. A decision
    takes up to ~30 steps, so the few microseconds each saves add up."""

    context_in: torch.Tensor  # [H, LOAD_FEATURES + N]
    context_in_bias: torch.Tensor  # [H]
    context_out: torch.Tensor  # [Hb, H]
    context_out_bias: torch.Tensor  # [Hb]: the block layer's bias folded in
    block_t: torch.Tensor  # [BLOCK_FEATURES, Hb]
    pool: torch.Tensor  # [Hb, Hb]
    mix_bias: torch.Tensor  # [Hb]
    mix_t: torch.Tensor  # [Hb, Hb]
    value: torch.Tensor  # [Hb]

    @classmethod
    def of(cls, network: QNetwork) -> FoldedNetwork:
        with torch.no_grad():
            return cls(
                network.context_in.weight.detach().clone(),
                network.context_in.bias.detach().clone(),
                network.context_out.weight.detach().clone(),
                (network.context_out.bias + network.block.bias).detach().clone(),
                network.block.weight.detach().t().contiguous(),
                network.pool.weight.detach().clone(),
                network.mix.bias.detach().clone(),
                network.mix.weight.detach().t().contiguous(),
                network.value.weight.detach()[0].clone(),
            )

    def scores(self, load: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The network's Q-values for one state ([N]) less the value bias, which
        no choice between blocks depends on."""
        context = F.linear(load, self.context_in, self.context_in_bias).relu_()
        context = F.linear(context, self.context_out, self.context_out_bias)  # [Hb]
        z = torch.addmm(context, blocks, self.block_t).relu_()  # [N, Hb]
        pooled = F.linear(z.amax(0), self.pool, self.mix_bias)  # [Hb]
        z = torch.addmm(pooled, z, self.mix_t).relu_()  # [N, Hb]
        return torch.mv(z, self.value)  # [N]


def choose(
    network: QNetwork, features: tuple[torch.Tensor, torch.Tensor], legal: torch.Tensor
) -> int:
    """The legal action with the highest Q-value."""
    with torch.inference_mode():
        q = network(*features)
    return int(q.masked_fill(~legal, float("-inf")).argmax())


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


@dataclass
class RLPolicy:
    """Serves a trained Q-network: drop the best-valued block until the plan fits."""

    network: QNetwork
    name: str = "rl"

    def __post_init__(self) -> None:
        self._tables: tuple[ModelProfile, ProfileTables] | None = None
        self._folded: FoldedNetwork | None = None

    def tables(self, profile: ModelProfile) -> ProfileTables:
        """The profile's load-independent features, kept for the last profile seen."""
        if self._tables is None or self._tables[0] is not profile:
            self._tables = (profile, ProfileTables.of(profile))
        return self._tables[1]

    def decide(self, state: PolicyState) -> PruningPlan:
        if self.network.num_blocks != state.profile.num_blocks:
            raise ValueError(
                f"the agent was trained for {self.network.num_blocks} blocks, "
                f"the model has {state.profile.num_blocks}"
            )
        if self._folded is None:
            self._folded = FoldedNetwork.of(self.network)
        folded = self._folded
        with one_thread(), torch.inference_mode():
            episode = StateEncoder(state, self.tables(state.profile))
            while not episode.fits:
                if episode.stuck:
                    plan = episode.plan()
                    raise state.infeasible(self.name, plan, "even one kept block does not fit")
                q = folded.scores(*episode.encode(copy=False)) + episode.dropped_mask
                episode.drop(int(q.argmax()))
            return episode.plan()

    def save(self, path: str | Path, meta: dict[str, object] | None = None) -> None:
        """Weights as safetensors; shapes and training facts in its metadata."""
        info = {
            "num_blocks": self.network.num_blocks,
            "hidden": self.network.hidden,
            "block_hidden": self.network.block_hidden,
            "features": FEATURES_VERSION,
        }
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
        if info.get("features") != FEATURES_VERSION:
            raise ValueError(
                f"{path}: agent trained on state features version {info.get('features', 1)}, "
                f"this code uses version {FEATURES_VERSION}: retrain it (elasticfleet agent train)"
            )
        network = QNetwork(int(info["num_blocks"]), int(info["hidden"]), int(info["block_hidden"]))
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

    episodes: int = 2500
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
    budget_range: tuple[float, float] = (0.45, 0.95)
    # Curriculum: the lowest budget share starts here and falls linearly to
    # budget_range[0] over this share of the episodes (short episodes first).
    curriculum_start: float = 0.85
    curriculum: float = 0.4
    rap_share: float = 0.5  # episodes drawn from RAP's ten (batch, sequence) scenarios


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
    dense = predict_memory(profile.config, None, batch, seq, profile.dtype).total_bytes
    lowest, highest = config.budget_range
    if config.curriculum > 0:
        done = min(1.0, progress / config.curriculum)
        start = config.curriculum_start
        lowest = max(lowest, start + (lowest - start) * done)
    budget = int(dense * rng.uniform(lowest, highest))
    return PolicyState(budget_bytes=budget, batch_size=batch, seq_len=seq, profile=profile)


class ReplayBuffer:
    """A ring of n-step transitions held in preallocated tensors."""

    def __init__(self, capacity: int, blocks: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.cursor = 0
        self.load = torch.zeros(capacity, LOAD_FEATURES + blocks)
        self.blocks = torch.zeros(capacity, blocks, BLOCK_FEATURES)
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.reward = torch.zeros(capacity)
        self.next_load = torch.zeros(capacity, LOAD_FEATURES + blocks)
        self.next_blocks = torch.zeros(capacity, blocks, BLOCK_FEATURES)
        self.next_legal = torch.zeros(capacity, blocks, dtype=torch.bool)
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
        self.load[i], self.blocks[i] = features
        self.action[i], self.reward[i] = action, reward
        self.next_load[i], self.next_blocks[i] = following
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
    tables = ProfileTables.of(profile)
    step_cost = [config.tie_break * float(s) for s in tables.step]
    log_dense = math.log(quality(PruningPlan.dense(layers)))
    started = time.perf_counter()
    steps = 0
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
        episode_state = StateEncoder(state, tables)
        features = episode_state.encode()
        log_previous = 0.0  # the estimate's log-perplexity increase so far, capped
        trajectory: list[_Step] = []
        while not episode_state.fits:
            if rng.random() < epsilon:
                action = rng.choice([b for b, keep in enumerate(episode_state.kept) if keep])
            else:
                action = choose(network, features, episode_state.legal())
            episode_state.drop(action)
            following = episode_state.encode()
            next_legal = episode_state.legal()
            done = episode_state.fits or episode_state.stuck
            # Each drop is charged the log-perplexity it adds, so credit lands on
            # the step that caused it; the sum over an episode is the plan's total.
            increase = math.log(quality(episode_state.plan())) - log_dense
            log_quality = min(increase, config.cost_cap)
            reward = log_previous - log_quality - step_cost[action]
            log_previous = log_quality
            if done and not episode_state.fits:
                reward += FAIL_PENALTY
            trajectory.append(_Step(features, action, reward, following, next_legal, done))
            features = following
            if memory.size >= config.batch_size:
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
    return RLPolicy(network), stats


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
    following = (memory.next_load[index], memory.next_blocks[index])
    legal = memory.next_legal[index]
    done = memory.done[index]
    with torch.no_grad():
        best = network(*following).masked_fill(~legal, float("-inf")).argmax(-1)
        value = target(*following).gather(1, best[:, None])[:, 0]
        goal = memory.reward[index] + torch.where(done, torch.zeros_like(value), value)
    predicted = network(memory.load[index], memory.blocks[index])
    predicted = predicted.gather(1, memory.action[index][:, None])[:, 0]
    loss = F.smooth_l1_loss(predicted, goal)
    optimiser.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    nn.utils.clip_grad_norm_(network.parameters(), 10.0)
    optimiser.step()
