"""The RAP agent's serving half: state features, the Q-network and the policy
that runs it.

State (as in RAP): the memory budget, batch size, sequence length and the
KV-cache share of memory, plus the current keep-mask. Action: drop one more
block, until the plan fits the budget.

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

Serving needs only torch and this module: `RLPolicy.load` reads the network
from a safetensors checkpoint; nothing here trains (that is
`elasticfleet.agent.rl.training`). The policy only reads the profile.
Decisions run on one thread (`one_thread`) with the network's weights folded
for single-state steps (`FoldedNetwork`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from elasticfleet.agent.policy import PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality, block_importance
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
COST_CAP = 3.0  # log-perplexity increases in features are clipped to +-this
RATIO_CAP = 4.0  # byte ratios are capped here, then divided by it


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
        dense = predict_memory(
            profile.config, None, state.batch_size, state.seq_len, state.serving_dtype
        )
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
