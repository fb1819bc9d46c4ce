"""The RAP agent's serving half: state features, the Q-network's weights and
the policy that runs them.

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

Serving computes with numpy (float32) and reads the checkpoint with
`safetensors.numpy`, never torch: the operator runs this policy (the CRD's
default), and a network this small needs a few tiny matrix products per
dropped block, so torch would be hundreds of MB in the operator's image for
nothing. The trainable network (`QNetwork`, a torch module) lives in the
training half (`elasticfleet.agent.rl.training`), with the conversions:
it reads the features made here through `torch.from_numpy`, and hands a
trained network back as `NetworkWeights`. The features are computed exactly
as the torch code that trained the committed agent computed them (see
`StateEncoder.encode`), so training still reproduces it bit for bit. The
policy only reads the profile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

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

Floats = npt.NDArray[np.float32]
Indices = npt.NDArray[np.int64]
Bits = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ProfileTables:
    """What the features need from a profile, independent of the load."""

    rank: Indices  # [N] GSI rank of each block (0 = least important)
    by_rank: Indices  # [N] blocks in rank order
    cost: Floats  # [N] log(estimate / dense) if the block were the deepest dropped
    step: Floats  # [N] the log-perplexity GSI measured for removing the block
    static: Floats  # [N, 5] attention, depth, rank, cost, step (scaled)
    # [N, N]: row r is every block's added-cost feature once the deepest
    # dropped block has GSI rank r (a drop then updates it with one copy).
    added: Floats

    @classmethod
    def of(cls, profile: ModelProfile) -> ProfileTables:
        blocks = profile.num_blocks
        layers = profile.config.num_hidden_layers
        by_rank = np.array(profile.importance_rank(), dtype=np.int64)
        rank = np.empty(blocks, dtype=np.int64)
        rank[by_rank] = np.arange(blocks)
        quality = ProfileQuality(profile)
        dense = math.log(profile.dense_perplexity)
        cost = np.array(
            [
                math.log(quality(PruningPlan.without_blocks(layers, [b]))) - dense
                for b in range(blocks)
            ],
            dtype=np.float32,
        )
        step = np.array(block_importance(profile), dtype=np.float32)
        static = np.stack(
            [
                np.array([1.0 - b % 2 for b in range(blocks)], dtype=np.float32),
                np.array([(b // 2) / max(layers - 1, 1) for b in range(blocks)], dtype=np.float32),
                rank.astype(np.float32) / blocks,
                cost.clip(-COST_CAP, COST_CAP),
                np.minimum(10 * step, 2.0),
            ],
            axis=1,
        )
        # Row r: each block ranked deeper than r adds its cost less that of
        # the block of rank r; the others add nothing.
        deeper = rank[None, :] > np.arange(blocks)[:, None]
        added = np.where(deeper, cost[None, :] - cost[by_rank][:, None], np.float32(0))
        return cls(rank, by_rank, cost, step, static, added.clip(-COST_CAP, COST_CAP))


class StateEncoder:
    """One decision as an episode: the plan so far (keep-mask, bytes over
    budget, deepest-ranked dropped block) and the network's inputs for it.
    Load-dependent figures are computed once per state; each drop updates the
    rest in place, so a step costs a handful of small array operations."""

    def __init__(self, state: PolicyState, tables: ProfileTables) -> None:
        profile = state.profile
        dense = predict_memory(
            profile.config, None, state.batch_size, state.seq_len, state.serving_dtype
        )
        blocks = profile.num_blocks
        self.tables = tables
        self.dense_bytes = dense.total_bytes
        self.savings_bytes = [state.block_savings(b) for b in range(blocks)]
        self.savings = np.array(self.savings_bytes, dtype=np.float32)
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
        self._keep_ranked = np.ones(blocks, dtype=np.float32)
        # -inf for dropped blocks, added to Q-values to mask them.
        self.dropped_mask = np.zeros(blocks, dtype=np.float32)
        self._load = np.ones(LOAD_FEATURES + blocks, dtype=np.float32)  # then the keep-mask
        self._load[:LOAD_FEATURES] = [
            state.budget_bytes / total,  # how hard the budget squeezes
            max(self.excess, 0) / total,  # bytes still to free
            math.log2(state.batch_size) / 8,
            math.log2(state.seq_len) / 16,
            dense.kv_bytes / total,  # RAP's KV-cache ratio
            1.0,  # share of blocks kept
            0.0,  # estimated cost so far
        ]
        freed = np.minimum(self.savings / total * blocks, RATIO_CAP) / RATIO_CAP
        self._blocks = np.concatenate(
            [
                np.ones((blocks, 1), dtype=np.float32),  # kept
                tables.static,
                freed[:, None],
                tables.cost.clip(-COST_CAP, COST_CAP)[:, None],  # added cost now
                np.zeros((blocks, 4), dtype=np.float32),  # byte ratios and fit bits (encode)
            ],
            axis=1,
        )

    @property
    def fits(self) -> bool:
        return self.excess <= 0

    @property
    def stuck(self) -> bool:
        """Over budget with one block left: nothing more may be dropped."""
        return self.kept_count <= 1 and not self.fits

    def legal(self) -> Bits:
        """Blocks that may be dropped next: kept ones, unless only one is left."""
        if self.kept_count <= 1:
            return np.zeros(len(self.kept), dtype=np.bool_)
        return np.array(self.kept)

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

    def encode(self, copy: bool = True) -> tuple[Floats, Floats]:
        """(load [LOAD_FEATURES + N], blocks [N, BLOCK_FEATURES]) for the plan
        so far; without `copy` they are views the next drop overwrites.

        Every figure is the float32 value the torch code that trained the
        committed agent computed, bit for bit: scalars round to float32
        before they meet an array, as torch's do, and the running sum of
        freed bytes accumulates in float64 and rounds each partial sum to
        float32, as torch's CPU cumsum does (numpy's float32 cumsum would
        accumulate in float32)."""
        load = self._load
        load[1] = max(self.excess, 0) / self.dense_bytes  # bytes still to free
        load[5] = self.kept_count / len(self.kept)
        load[6] = min(self.current, COST_CAP)
        need = np.float32(max(self.excess, 1) * RATIO_CAP)
        ranked = self.ranked_savings * self._keep_ranked
        reach = ranked.cumsum(dtype=np.float64).astype(np.float32)[self._rank]
        ratios = np.minimum(np.stack([self.savings, reach], axis=1) / need, np.float32(1))
        self._blocks[:, 8:10] = ratios
        self._blocks[:, 10:] = ratios >= 1 / RATIO_CAP  # the ratio before capping is >= 1
        if copy:
            return self._load.copy(), self._blocks.copy()
        return self._load, self._blocks


def encode_state(state: PolicyState, plan: PruningPlan) -> tuple[Floats, Floats]:
    """The network's inputs for `plan` under `state`: (load features then the
    keep-mask, per-block features)."""
    encoder = StateEncoder(state, ProfileTables.of(state.profile))
    for block, keep in enumerate(plan.to_mask()):
        if not keep:
            encoder.drop(block)
    return encoder.encode()


def parameter_shapes(num_blocks: int, hidden: int, block_hidden: int) -> dict[str, tuple[int, ...]]:
    """The Q-network's parameters by name and shape, as its checkpoint (and
    the training half's `QNetwork`, a state dict of these) holds them: a
    context MLP reads the state (load features and keep-mask, one row) into
    `hidden` then `block_hidden` units; a narrow layer shared by all blocks
    reads each block's features (`block`), mixes in the max over blocks
    (`pool`, `mix`) and scores it (`value`). The per-block part stays narrow
    so a decision step is a few tiny matrix products."""
    return {
        "context_in.weight": (hidden, LOAD_FEATURES + num_blocks),
        "context_in.bias": (hidden,),
        "context_out.weight": (block_hidden, hidden),
        "context_out.bias": (block_hidden,),
        "block.weight": (block_hidden, BLOCK_FEATURES),
        "block.bias": (block_hidden,),
        "mix.weight": (block_hidden, block_hidden),
        "mix.bias": (block_hidden,),
        "pool.weight": (block_hidden, block_hidden),
        "value.weight": (1, block_hidden),
        "value.bias": (1,),
    }


@dataclass(frozen=True)
class NetworkWeights:
    """A trained Q-network: its sizes and its float32 parameters by name
    (`parameter_shapes`), checked when made, so a checkpoint for another
    network fails at load rather than at the first decision."""

    num_blocks: int
    hidden: int
    block_hidden: int
    tensors: Mapping[str, Floats]

    def __post_init__(self) -> None:
        expected = parameter_shapes(self.num_blocks, self.hidden, self.block_hidden)
        if set(self.tensors) != set(expected):
            differ = sorted(set(self.tensors) ^ set(expected))
            raise ValueError(f"the agent's parameters are not the network's: {', '.join(differ)}")
        for name, shape in expected.items():
            tensor = self.tensors[name]
            if tensor.shape != shape or tensor.dtype != np.float32:
                raise ValueError(
                    f"the agent's {name} is {tensor.dtype} {list(tensor.shape)}, "
                    f"the network's is float32 {list(shape)}"
                )


@dataclass(frozen=True)
class FoldedNetwork:
    """A network's weights laid out for one decision step: biases folded
    where they can be, matrices transposed once to the layout the products
    read, so a step is a handful of numpy calls. A decision takes up to ~30
    steps, so the microseconds each saves add up."""

    context_in: Floats  # [LOAD_FEATURES + N, H]
    context_in_bias: Floats  # [H]
    context_out: Floats  # [H, Hb]
    context_out_bias: Floats  # [Hb]: the block layer's bias folded in
    block: Floats  # [BLOCK_FEATURES, Hb]
    pool: Floats  # [Hb, Hb]
    mix_bias: Floats  # [Hb]
    mix: Floats  # [Hb, Hb]
    value: Floats  # [Hb]

    @classmethod
    def of(cls, network: NetworkWeights) -> FoldedNetwork:
        w = network.tensors

        def transposed(name: str) -> Floats:
            return np.ascontiguousarray(w[name].T)

        return cls(
            transposed("context_in.weight"),
            w["context_in.bias"].copy(),
            transposed("context_out.weight"),
            w["context_out.bias"] + w["block.bias"],
            transposed("block.weight"),
            transposed("pool.weight"),
            w["mix.bias"].copy(),
            transposed("mix.weight"),
            w["value.weight"][0].copy(),
        )

    def scores(self, load: Floats, blocks: Floats) -> Floats:
        """The network's Q-values for one state ([N]) less the value bias, which
        no choice between blocks depends on."""
        context = np.maximum(load @ self.context_in + self.context_in_bias, 0)  # [H]
        context = context @ self.context_out + self.context_out_bias  # [Hb]
        z = np.maximum(blocks @ self.block + context, 0)  # [N, Hb]
        # What the other blocks offer (e.g. the cheapest one that would make
        # the plan fit) matters to each block's value: max-pool over blocks.
        pooled = z.max(axis=0) @ self.pool + self.mix_bias  # [Hb]
        z = np.maximum(z @ self.mix + pooled, 0)  # [N, Hb]
        scores: Floats = z @ self.value  # [N]
        return scores


@dataclass
class RLPolicy:
    """Serves a trained Q-network: drop the best-valued block until the plan fits."""

    network: NetworkWeights
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
        """Drop the best-valued kept block until the plan fits. A decision
        runs on the caller's thread alone: the products are below the sizes
        at which numpy's BLAS (OpenBLAS) splits work across threads (for
        SmolLM2's agent, measured: the process spends no CPU time outside the
        calling thread), so busy cores cannot stall it on a helper thread."""
        if self.network.num_blocks != state.profile.num_blocks:
            raise ValueError(
                f"the agent was trained for {self.network.num_blocks} blocks, "
                f"the model has {state.profile.num_blocks}"
            )
        if self._folded is None:
            self._folded = FoldedNetwork.of(self.network)
        folded = self._folded
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
        network = self.network
        info = {
            "num_blocks": network.num_blocks,
            "hidden": network.hidden,
            "block_hidden": network.block_hidden,
            "features": FEATURES_VERSION,
        }
        metadata = {"agent": json.dumps(info), "meta": json.dumps(meta or {}, sort_keys=True)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(network.tensors), str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> RLPolicy:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if "agent" not in metadata:
            raise ValueError(f"{path}: not an elasticfleet RL checkpoint (no agent metadata)")
        info = json.loads(metadata["agent"])
        if info.get("features") != FEATURES_VERSION:
            raise ValueError(
                f"{path}: agent trained on state features version {info.get('features', 1)}, "
                f"this code uses version {FEATURES_VERSION}: retrain it (elasticfleet agent train)"
            )
        sizes = (int(info["num_blocks"]), int(info["hidden"]), int(info["block_hidden"]))
        try:
            network = NetworkWeights(*sizes, load_file(str(path)))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return cls(network)
