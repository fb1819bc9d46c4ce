"""The RAP agent's serving half: state features, the Q-network's weights and
the policy that runs them.

State (as in RAP): the memory budget, batch size, sequence length and the
KV-cache share of memory, plus the plan so far: each block's rung on the
precision ladder and each KV cache's level. Action: one step down the
ladder (`elasticfleet.agent.policy.Ladder`), for one block (full to int8,
int8 to int4, int4 to dropped; full to dropped on a pruning-only ladder) or
for one KV cache (full to int8), until the plan fits. So a model with L
layers has 3L actions: 2L block steps, then L KV steps.

Besides RAP's load features the network sees, for every action, what the
profile says of it: block kind, depth and GSI rank, the block's rung, the
log-perplexity the step adds by the profile's estimate, the bytes it frees
at this load (relative to the model and to the bytes still to free, with a
bit for whether it alone would make the plan fit), where it stands among
the legal actions ordered by cost per byte (greedy's order), and the bytes
freed by it together with every action cheaper per byte than it, again
with a fit bit. RAP's flat MLP learns 2L block identities from its
keep-mask alone (our first version did that and never beat a fixed ratio);
here one narrow MLP scores every action from a context (load features and
the plan's levels) plus the action's features, with one max-pool over
actions so each action's value can depend on what the others offer
(Q(s, a) = MLP(context(s), action(s, a), max over b of action(s, b))).

An agent is trained for one ladder: the full one (the profile's level
costs; the committed `DEFAULT_AGENT`), or keep/drop only (`pruning_only`;
the committed `PRUNING_AGENT`, the baseline the precision benchmark
compares against). The checkpoint records which.

Serving computes with numpy (float32 for the network) and reads the
checkpoint with `safetensors.numpy`, never torch: the operator runs this
policy (the CRD's default), and a network this small needs a few tiny
matrix products per step, so torch would be hundreds of MB in the
operator's image for nothing. The trainable network (`QNetwork`, a torch
module) lives in the training half (`elasticfleet.agent.rl.training`),
which reads the features made here through `torch.from_numpy` and hands a
trained network back as `NetworkWeights`. The policy only reads the
profile.
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

from elasticfleet.agent.policy import MIN_STEP_COST, Ladder, PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import level_cost
from elasticfleet.worker.model.memory import block_bytes_at, kv_bytes_per_token, predict_memory
from elasticfleet.worker.model.plan import DROPPED, FULL, INT8, WEIGHT_LEVELS, PruningPlan

#: The committed agent for the shipped model (the full ladder), next to its profile.
DEFAULT_AGENT = DEFAULT_PROFILE.with_suffix(".agent.safetensors")
#: The committed keep/drop-only agent: the precision benchmark's baseline.
PRUNING_AGENT = DEFAULT_PROFILE.with_suffix(".pruning-agent.safetensors")
#: Per-state inputs before the plan's levels: budget, bytes still to free,
#: batch, sequence, KV share, share of blocks kept, estimated cost so far.
LOAD_FEATURES = 7
#: Per-action inputs, in this order: a step of an attention block, of an
#: FFN block, of a KV cache; depth; GSI rank; the rung it steps from; whether
#: it drops; the cost it adds, clipped, and on a log scale; bytes freed
#: relative to the model, and to the bytes still to free; the bytes freed
#: with every cheaper-per-byte action, to the bytes still to free; its place
#: in greedy's order; how much dearer per byte than the cheapest (log
#: scale); whether its bytes alone, and with the cheaper ones', make the
#: plan fit.
ACTION_FEATURES = 16
#: Checkpoints record this; an agent trained on other features will not load.
FEATURES_VERSION = 3
COST_CAP = 3.0  # log-perplexity increases in features are clipped to +-this
RATIO_CAP = 4.0  # byte ratios are capped here, then divided by it

Floats = npt.NDArray[np.float32]
Doubles = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]
Bits = npt.NDArray[np.bool_]


def context_width(num_blocks: int) -> int:
    """The context's inputs: load features, each block's rung, each KV level."""
    return LOAD_FEATURES + num_blocks + num_blocks // 2


@dataclass(frozen=True)
class LadderTables:
    """What the features need from a profile and a ladder, independent of the load."""

    ladder: tuple[str, ...]  # the weight rungs, full first, dropped last
    kv: bool  # whether KV caches may go to int8
    rank: Indices  # [N] GSI rank of each block (0 = least important)
    log_at: Doubles  # [N + 1] log of the estimate once the deepest drop has rank d (index d + 1)
    importance: Doubles  # [N] GSI importance: a drop's cost on a keep/drop ladder
    level_cost: Doubles  # [N, R] the measured cost of each block at each rung (dropped: 0)
    kv_cost: Doubles  # [L] each KV cache's measured int8 cost
    code: Floats  # [R] each rung's place in WEIGHT_LEVELS, scaled to [0, 1]
    static: Floats  # [3L, 5] attention, FFN, KV, depth, rank (scaled)

    @classmethod
    def of(cls, profile: ModelProfile, pruning_only: bool = False) -> LadderTables:
        blocks = profile.num_blocks
        layers = profile.config.num_hidden_layers
        ladder = Ladder(profile)
        rungs = (FULL, DROPPED) if pruning_only else ladder.levels
        kv = ladder.kv and not pruning_only
        quality = ladder.quality
        rank = np.array([quality.rank[b] for b in range(blocks)], dtype=np.int64)
        log_at = np.array([math.log(quality.at_depth(d)) for d in range(-1, blocks)])
        costs = np.array(
            [
                [level_cost(profile, r, b) if r != DROPPED else 0.0 for r in rungs]
                for b in range(blocks)
            ]
        )
        kv_cost = np.array(
            [level_cost(profile, "kv_int8", i) if kv else 0.0 for i in range(layers)]
        )
        code = np.array([WEIGHT_LEVELS.index(r) / 3 for r in rungs], dtype=np.float32)
        block = np.arange(blocks)
        layer_of = np.concatenate([block // 2, np.arange(layers)])
        static = np.stack(
            [
                np.concatenate([block % 2 == 0, np.zeros(layers)]),
                np.concatenate([block % 2 == 1, np.zeros(layers)]),
                np.concatenate([np.zeros(blocks), np.ones(layers)]),
                layer_of / max(layers - 1, 1),
                np.concatenate([rank, rank[0::2]]) / blocks,
            ],
            axis=1,
        ).astype(np.float32)
        importance = np.array(ladder.importance)
        return cls(rungs, kv, rank, log_at, importance, costs, kv_cost, code, static)


class LadderEpisode:
    """One decision as an episode: the plan so far (each block's rung, each KV
    cache's level, bytes over budget, the deepest-ranked dropped block) and
    the network's inputs for it.

    Costs and bytes freed are `Ladder.cost` and `Ladder.freed`, computed the
    same way over every action at once: an agent that always took the action
    cheapest per byte would make greedy's plan (tests/agent/test_rl.py).

    A decision on the full ladder takes up to ~150 steps against RAP's ~30,
    and the operator waits for it, so a step must cost tens of microseconds:
    what depends on one action alone is updated when it changes (`_price`),
    whole-array work happens once per step in `encode` with few numpy calls,
    and the per-action features are held feature-major (one row per
    feature: each update writes contiguous memory; `encode` hands out the
    transposed view)."""

    def __init__(self, state: PolicyState, tables: LadderTables) -> None:
        profile = state.profile
        config, dtype = profile.config, state.serving_dtype
        dense = predict_memory(config, None, state.batch_size, state.seq_len, dtype)
        blocks = profile.num_blocks
        layers = config.num_hidden_layers
        actions = blocks + layers
        self.tables = tables
        self.blocks, self.actions = blocks, actions
        rungs = tables.ladder
        self._last = len(rungs) - 1
        tokens = state.batch_size * state.seq_len
        #: [N, R] each block's bytes at each rung at this dtype.
        self._bytes = np.array(
            [[block_bytes_at(config, b, r, dtype) for r in rungs] for b in range(blocks)],
            dtype=np.float64,
        )
        kv_full = kv_bytes_per_token(config, dtype) * tokens
        kv_int8 = kv_bytes_per_token(config, dtype, INT8) * tokens
        self._kv_bytes = np.array([kv_full, kv_int8], dtype=np.float64)  # a cache: full, int8
        self.dense_bytes = dense.total_bytes
        #: Bytes the plan is over budget; it fits once this is <= 0.
        self.excess = dense.total_bytes - state.budget_bytes
        self.rung = np.zeros(blocks, dtype=np.int64)
        self.kv_level = np.zeros(layers, dtype=np.int64)  # 0: full, 1: int8
        self.kept_count = blocks
        self.deepest = -1  # GSI rank of the deepest dropped block
        self.paid = 0.0  # the measured costs of the kept blocks' rungs and int8 KV caches
        self._legal = np.ones(actions, dtype=np.bool_)
        self._legal[blocks:] = tables.kv
        self.freed = np.zeros(actions)
        # log(cost per byte) of each action's next step (greedy's measure;
        # inf: not legal), and the bytes it frees (0: not legal).
        self._log_efficiency = np.full(actions, np.inf)
        self._legal_freed = np.zeros(actions)
        self._positions = np.arange(actions, dtype=np.float64)
        total = float(dense.total_bytes)
        # Features 7-13 before scaling (`encode` scales and caps them in one
        # call each): cost, log10 of cost in millionths, freed, freed, then
        # per step the bytes freed with every cheaper action, the place in
        # greedy's order and the log of how much dearer per byte than the cheapest.
        self._raw = np.zeros((7, actions))
        self._scaled = np.zeros((9, actions))  # features 7-15
        self._scale = np.array([1.0, 1 / 6, blocks / total / RATIO_CAP, 0, 0, 0, 0.1])[:, None]
        self._cap = np.array([COST_CAP, 1, 1, 1, 1, 1, 1])[:, None]
        self._features = np.zeros((ACTION_FEATURES, actions), dtype=np.float32)
        self._features[:5] = tables.static.T
        self._features[6, :blocks] = self._last == 1  # a pruning-only ladder's steps drop
        self._load = np.zeros(context_width(blocks), dtype=np.float32)  # then the levels
        self._load[:LOAD_FEATURES] = [
            state.budget_bytes / total,  # how hard the budget squeezes
            0.0,  # bytes still to free (encode)
            math.log2(state.batch_size) / 8,
            math.log2(state.seq_len) / 16,
            dense.kv_bytes / total,  # RAP's KV-cache ratio
            1.0,  # share of blocks kept
            0.0,  # estimated cost so far
        ]
        kv = np.arange(blocks, actions)
        self._set(kv, np.maximum(tables.kv_cost, MIN_STEP_COST), np.full(layers, kv_full - kv_int8))
        for action in kv.tolist() if not tables.kv else ():
            self._close(action)
        self._price(np.arange(blocks))

    def _set(self, index: Indices | int, cost: Doubles | float, freed: Doubles | float) -> None:
        """Record the cost and bytes of the next step of legal action(s) `index`."""
        raw = self._raw
        raw[0, index] = cost
        raw[1, index] = np.log10(np.multiply(cost, 1e6))
        raw[2, index] = raw[3, index] = self.freed[index] = self._legal_freed[index] = freed
        self._log_efficiency[index] = np.log(cost / np.maximum(freed, 1.0))

    def _close(self, action: int) -> None:
        """`action` may no longer be taken."""
        self._legal[action] = False
        self._log_efficiency[action] = np.inf
        self._legal_freed[action] = 0.0

    def _price(self, blocks: Indices) -> None:
        """The next step of each of `blocks` (kept ones): what it frees and costs."""
        rung = self.rung[blocks]
        after = rung + 1
        drops = after == self._last
        freed = self._bytes[blocks, rung] - self._bytes[blocks, after]
        kv = self._kv_bytes[self.kv_level[blocks // 2]]
        freed += np.where(drops & (blocks % 2 == 0), kv, 0.0)
        costs = self.tables.level_cost
        precision = np.maximum(costs[blocks, after] - costs[blocks, rung], MIN_STEP_COST)
        self._set(blocks, np.where(drops, self._drop_cost(blocks), precision), freed)
        if self.kept_count <= 1:  # the last kept block stays
            for block in blocks[drops].tolist():
                self._close(block)

    def _price_one(self, block: int) -> None:
        """`_price` for the one block a step changed, in Python floats: the
        same IEEE operations on the same values, so the same figures, at a
        fraction of the cost of numpy calls on one-element arrays."""
        rung = int(self.rung[block])
        after = rung + 1
        freed = float(self._bytes[block, rung] - self._bytes[block, after])
        if after < self._last:
            costs = self.tables.level_cost
            cost = max(float(costs[block, after] - costs[block, rung]), MIN_STEP_COST)
        elif self.kept_count <= 1:  # the last kept block stays
            self._close(block)
            return
        else:
            if block % 2 == 0:
                freed += float(self._kv_bytes[self.kv_level[block // 2]])
            cost = float(self._drop_cost(np.array([block]))[0])
        self._set(block, cost, freed)

    def _drop_cost(self, blocks: Indices) -> Doubles:
        """What dropping each of `blocks` costs, given the deepest drop so far."""
        tables = self.tables
        if self._last == 1:
            cost: Doubles = np.maximum(tables.importance[blocks], MIN_STEP_COST)
            return cost
        deeper = np.maximum(tables.rank[blocks], self.deepest) + 1
        rise = tables.log_at[deeper] - tables.log_at[self.deepest + 1]
        cost = np.maximum(rise - tables.level_cost[blocks, self._last - 1], MIN_STEP_COST)
        return cost

    @property
    def fits(self) -> bool:
        return self.excess <= 0

    @property
    def cost(self) -> Doubles:
        """Each action's next step's cost in log-perplexity (stale where not legal)."""
        cost: Doubles = self._raw[0]
        return cost

    @property
    def estimate(self) -> float:
        """The profile's estimate of the plan's log-perplexity over dense
        (`ProfileQuality`, kept up step by step)."""
        log_at = self.tables.log_at
        return float(log_at[self.deepest + 1] - log_at[0]) + self.paid

    def legal(self) -> Bits:
        """Actions that may be taken next: a step down that exists, but no
        drop of the last kept block (a view the next step changes)."""
        return self._legal

    def plan(self) -> PruningPlan:
        rungs = self.tables.ladder
        kv = [INT8 if level else FULL for level in self.kv_level.tolist()]
        return PruningPlan.from_levels([rungs[r] for r in self.rung.tolist()], kv)

    def describe(self, action: int) -> str:
        if action >= self.blocks:
            return f"layer {action - self.blocks}'s KV cache to int8"
        return f"block {action} from {self.tables.ladder[int(self.rung[action])]}"

    def take(self, action: int) -> None:
        """One step down the ladder (refused if `legal` does not allow it)."""
        if not 0 <= action < self.actions:
            raise ValueError(f"no action {action}: there are {self.actions}")
        if not self._legal[action]:
            plan = self.plan().describe()
            raise ValueError(f"{self.describe(action)} is not a step {plan} allows")
        tables, blocks, features = self.tables, self.blocks, self._features
        self.excess -= int(self.freed[action])
        if action >= blocks:
            layer = action - blocks
            self.kv_level[layer] = 1
            self._load[LOAD_FEATURES + action] = features[5, action] = 1.0
            self._close(action)
            self.paid += float(tables.kv_cost[layer])
            if self.rung[2 * layer] == self._last - 1:  # its drop now frees an int8 cache
                self._price_one(2 * layer)
            return
        block = action
        rung = int(self.rung[block]) + 1
        self.rung[block] = rung
        self._load[LOAD_FEATURES + block] = features[5, block] = tables.code[rung]
        features[6, block] = rung == self._last - 1
        self.paid += float(tables.level_cost[block, rung] - tables.level_cost[block, rung - 1])
        if rung < self._last:
            self._price_one(block)
            return
        self._close(block)
        self.kept_count -= 1
        if block % 2 == 0:
            layer = block // 2
            if self._legal[blocks + layer]:
                self._close(blocks + layer)
            if self.kv_level[layer]:
                self.paid -= float(tables.kv_cost[layer])
        rank = int(tables.rank[block])
        if rank > self.deepest or self.kept_count == 1:  # drops cost more, or may not happen
            self.deepest = max(rank, self.deepest)
            self._price(np.flatnonzero(self.rung == self._last - 1))

    def encode(self, copy: bool = True) -> tuple[Floats, Floats]:
        """(context [LOAD_FEATURES + N + L], actions [3L, ACTION_FEATURES]) for
        the plan so far; without `copy` they are views the next step overwrites."""
        load, raw, scaled, scale = self._load, self._raw, self._scaled, self._scale
        excess = max(self.excess, 0)
        load[1] = excess / self.dense_bytes
        load[5] = self.kept_count / self.blocks
        load[6] = min(self.estimate, COST_CAP)
        order = self._log_efficiency.argsort(kind="stable")  # greedy's order, illegal last
        raw[5, order] = self._positions
        raw[4, order] = self._legal_freed[order].cumsum()
        cheapest = self._log_efficiency[order[0]]
        np.subtract(self._log_efficiency, cheapest if math.isfinite(cheapest) else 0, out=raw[6])
        scale[3] = scale[4] = 1 / (max(excess, 1) * RATIO_CAP)  # byte ratios, capped at RATIO_CAP
        scale[5] = 1 / max(int(np.count_nonzero(self._legal)), 1)
        np.multiply(raw, scale, out=scaled[:7])
        np.minimum(scaled[:7], self._cap, out=scaled[:7])
        np.greater_equal(scaled[3:5], 1 / RATIO_CAP, out=scaled[7:])
        features = self._features
        features[7:] = scaled
        if copy:
            return load.copy(), features.T.copy()
        return load, features.T


def parameter_shapes(num_blocks: int, hidden: int, block_hidden: int) -> dict[str, tuple[int, ...]]:
    """The Q-network's parameters by name and shape, as its checkpoint (and
    the training half's `QNetwork`, a state dict of these) holds them: a
    context MLP reads the state (load features and the plan's levels, one
    row) into `hidden` then `block_hidden` units; a narrow layer shared by
    all actions reads each action's features (`action`), mixes in the max
    over actions (`pool`, `mix`) and scores it (`value`). The per-action part
    stays narrow so a decision step is a few tiny matrix products."""
    return {
        "context_in.weight": (hidden, context_width(num_blocks)),
        "context_in.bias": (hidden,),
        "context_out.weight": (block_hidden, hidden),
        "context_out.bias": (block_hidden,),
        "action.weight": (block_hidden, ACTION_FEATURES),
        "action.bias": (block_hidden,),
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
    read, so a step is a handful of numpy calls. A decision on the full
    ladder takes up to ~150 steps, so the microseconds each saves add up."""

    context_in: Floats  # [context_width(N), H]
    context_in_bias: Floats  # [H]
    context_out: Floats  # [H, Hb]
    context_out_bias: Floats  # [Hb]: the action layer's bias folded in
    action: Floats  # [ACTION_FEATURES, Hb]
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
            w["context_out.bias"] + w["action.bias"],
            transposed("action.weight"),
            transposed("pool.weight"),
            w["mix.bias"].copy(),
            transposed("mix.weight"),
            w["value.weight"][0].copy(),
        )

    def scores(self, load: Floats, actions: Floats) -> Floats:
        """The network's Q-values for one state ([A]) less the value bias, which
        no choice between actions depends on."""
        context = np.maximum(load @ self.context_in + self.context_in_bias, 0)  # [H]
        context = context @ self.context_out + self.context_out_bias  # [Hb]
        z = np.maximum(actions @ self.action + context, 0)  # [A, Hb]
        # What the other actions offer (e.g. the cheapest one that would make
        # the plan fit) matters to each action's value: max-pool over actions.
        pooled = z.max(axis=0) @ self.pool + self.mix_bias  # [Hb]
        z = np.maximum(z @ self.mix + pooled, 0)  # [A, Hb]
        scores: Floats = z @ self.value  # [A]
        return scores


@dataclass
class RLPolicy:
    """Serves a trained Q-network: take the best-valued step down the ladder
    until the plan fits. An agent trained `pruning_only` only drops blocks,
    whatever the profile measured."""

    network: NetworkWeights
    pruning_only: bool = False
    name: str = "rl"

    def __post_init__(self) -> None:
        self._tables: tuple[ModelProfile, LadderTables] | None = None
        self._folded: FoldedNetwork | None = None

    def tables(self, profile: ModelProfile) -> LadderTables:
        """The profile's load-independent features, kept for the last profile seen."""
        if self._tables is None or self._tables[0] is not profile:
            self._tables = (profile, LadderTables.of(profile, self.pruning_only))
        return self._tables[1]

    def decide(self, state: PolicyState) -> PruningPlan:
        """Take the best-valued legal step until the plan fits. A decision
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
        episode = LadderEpisode(state, self.tables(state.profile))
        while not episode.fits:
            legal = episode.legal()
            if not legal.any():
                plan = episode.plan()
                raise state.infeasible(self.name, plan, "even one kept block does not fit")
            q = folded.scores(*episode.encode(copy=False))
            episode.take(int(np.where(legal, q, -np.inf).argmax()))
        return episode.plan()

    def save(self, path: str | Path, meta: dict[str, object] | None = None) -> None:
        """Weights as safetensors; shapes and training facts in its metadata."""
        network = self.network
        info = {
            "num_blocks": network.num_blocks,
            "hidden": network.hidden,
            "block_hidden": network.block_hidden,
            "features": FEATURES_VERSION,
            "ladder": "pruning" if self.pruning_only else "precision",
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
        return cls(network, pruning_only=info.get("ladder") == "pruning")
