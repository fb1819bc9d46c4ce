"""Memory policies: given a memory budget and the load, the level of each block.

Every policy answers the same question through one interface: from a
`PolicyState` (budget in bytes, batch size, sequence length, current plan and
the model's profile) return a `PruningPlan` whose predicted bytes (the shared
memory model, `predict_memory`) fit the budget, or raise `NoFeasiblePlan`
saying why none can. Policies have no Kubernetes or gRPC imports: the worker,
the operator and the benchmarks all call them the same way.

Each block stands on a ladder (full, int8, int4, dropped) and each KV cache
on its own (full, int8); a policy moves blocks down one rung at a time.
Which rungs exist depends on what the profile measured (`Ladder`): with
no level costs, the ladder is full-or-dropped and the policies prune as
they always did.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.quality import ProfileQuality, block_importance, level_cost
from elasticfleet.worker.model.memory import block_bytes_at, kv_bytes_per_token, predict_memory
from elasticfleet.worker.model.plan import (
    DROPPED,
    FULL,
    INT4,
    INT8,
    WEIGHT_LEVELS,
    PruningPlan,
    Step,
)


class NoFeasiblePlan(Exception):
    """No plan this policy may choose fits the budget."""


@dataclass(frozen=True)
class PolicyState:
    """What a policy decides from."""

    budget_bytes: int
    batch_size: int
    seq_len: int
    profile: ModelProfile
    current_plan: PruningPlan | None = None
    # The serving dtype bytes are counted in (None: the profile's).
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"budget must be positive, got {self.budget_bytes} bytes")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(
                f"batch size and sequence length must be at least 1, "
                f"got {self.batch_size} and {self.seq_len}"
            )

    def predicted_bytes(self, plan: PruningPlan) -> int:
        """The shared memory model's figure for `plan` at this load."""
        config = self.profile.config
        estimate = predict_memory(config, plan, self.batch_size, self.seq_len, self.serving_dtype)
        return estimate.total_bytes

    @property
    def serving_dtype(self) -> str:
        return self.dtype or self.profile.dtype

    def fits(self, plan: PruningPlan) -> bool:
        return self.predicted_bytes(plan) <= self.budget_bytes

    def block_savings(self, block: int) -> int:
        """Bytes freed by dropping full-precision `block` at this load: its
        weights, plus for an attention block its full KV cache at batch x
        sequence."""
        config, dtype = self.profile.config, self.serving_dtype
        kv = kv_bytes_per_token(config, dtype) if block % 2 == 0 else 0
        return block_bytes_at(config, block, FULL, dtype) + kv * self.batch_size * self.seq_len

    def infeasible(self, policy: str, plan: PruningPlan, detail: str) -> NoFeasiblePlan:
        return NoFeasiblePlan(
            f"{policy} policy: {detail}; its best plan ({plan.describe()}) needs "
            f"{self.predicted_bytes(plan):,} bytes at batch {self.batch_size} x "
            f"{self.seq_len} tokens, budget is {self.budget_bytes:,} bytes"
        )


#: What every step down the ladder costs at least, in log-perplexity: nothing is free.
MIN_STEP_COST = 1e-6


class Ladder:
    """The rungs a profile lets policies use, what each step costs in
    quality (log-perplexity, from the profile) and what it frees in bytes.

    Weight rungs: full, int8, int4, dropped when the profile measured int8
    and int4 costs, else full and dropped. The KV rung (full to int8) when
    it measured kv_int8 costs. Costs are the quality estimate's own
    (`ProfileQuality`): a rung below full costs its measured level cost less
    the rung above's; a drop costs what the estimate of the kept-or-dropped
    plan rises by (its GSI prefix) less what the block's rung already cost.
    With a pruning-only profile a drop costs the block's GSI importance, so
    greedy prunes as it did before levels existed."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        measured = profile.level_costs
        self.levels: tuple[str, ...] = (
            WEIGHT_LEVELS if INT8 in measured and INT4 in measured else (FULL, DROPPED)
        )
        self.kv = "kv_int8" in measured
        self.quality = ProfileQuality(profile)
        self.importance = block_importance(profile)
        self._deepest: dict[PruningPlan, int] = {}  # per plan asked about

    def steps(self, plan: PruningPlan) -> list[Step]:
        return plan.demotions(self.levels, self.kv)

    def take(self, plan: PruningPlan, step: Step) -> PruningPlan:
        return plan.demote(step, self.levels)

    def cost(self, plan: PruningPlan, step: Step) -> float:
        """The log-perplexity `step` adds (at least MIN_STEP_COST)."""
        kind, index = step
        if kind == "kv":
            return max(level_cost(self.profile, "kv_int8", index), MIN_STEP_COST)
        level = plan.weight_level(index)
        after = self.levels[self.levels.index(level) + 1]
        paid = level_cost(self.profile, level, index)
        if self.levels == (FULL, DROPPED):  # pruning only: GSI importance, as always
            return max(self.importance[index], MIN_STEP_COST)
        if after == DROPPED:
            quality = self.quality
            deepest = self._deepest.get(plan)
            if deepest is None:
                deepest = self._deepest[plan] = quality.deepest(plan)
            after_drop = quality.at_depth(max(deepest, quality.rank[index]))
            rise = math.log(after_drop) - math.log(quality.at_depth(deepest))
            return max(rise - paid, MIN_STEP_COST)
        return max(level_cost(self.profile, after, index) - paid, MIN_STEP_COST)

    def freed(self, state: PolicyState, plan: PruningPlan, step: Step) -> int:
        """Bytes `step` frees at the state's load and dtype."""
        config, dtype = self.profile.config, state.serving_dtype
        tokens = state.batch_size * state.seq_len
        kind, index = step
        if kind == "kv":
            full, narrow = (kv_bytes_per_token(config, dtype, lv) for lv in (FULL, INT8))
            return (full - narrow) * tokens
        level = plan.weight_level(index)
        after = self.levels[self.levels.index(level) + 1]
        freed = block_bytes_at(config, index, level, dtype) - block_bytes_at(
            config, index, after, dtype
        )
        if after == DROPPED and index % 2 == 0:
            freed += kv_bytes_per_token(config, dtype, plan.kv_level(index // 2)) * tokens
        return freed

    def efficiency(self, state: PolicyState, plan: PruningPlan, step: Step) -> float:
        """Quality cost per byte freed: what greedy minimises."""
        return self.cost(plan, step) / max(self.freed(state, plan, step), 1)


class Policy(Protocol):
    """Chooses a plan for a state; raises NoFeasiblePlan when none fits."""

    @property
    def name(self) -> str: ...

    def decide(self, state: PolicyState) -> PruningPlan: ...


@dataclass(frozen=True)
class NonePolicy:
    """Never prunes: the dense model, or nothing if even that does not fit."""

    name: str = "none"

    def decide(self, state: PolicyState) -> PruningPlan:
        plan = PruningPlan.dense(state.profile.config.num_hidden_layers)
        if not state.fits(plan):
            raise state.infeasible(self.name, plan, "it never prunes")
        return plan


@dataclass(frozen=True)
class StaticPolicy:
    """One fixed ladder chosen offline, whatever the load: drop that share
    of blocks, least important first, and hold every kept block at
    `precision` (full, int8 or int4)."""

    ratio: float
    precision: str = FULL
    name: str = "static"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"static pruning ratio must be in [0, 1), got {self.ratio}")
        if self.precision not in (FULL, INT8, INT4):
            raise ValueError(f"static precision must be full, int8 or int4, got {self.precision!r}")

    def plan(self, profile: ModelProfile) -> PruningPlan:
        """The one plan this policy ever returns for `profile`."""
        layers = profile.config.num_hidden_layers
        count = min(round(self.ratio * 2 * layers), 2 * layers - 1)
        dropped = set(profile.importance_rank()[:count])
        return PruningPlan.from_levels(
            [DROPPED if b in dropped else self.precision for b in range(2 * layers)]
        )

    def decide(self, state: PolicyState) -> PruningPlan:
        plan = self.plan(state.profile)
        if not state.fits(plan):
            raise state.infeasible(self.name, plan, f"its fixed ratio {self.ratio:.0%} is too low")
        return plan


@dataclass(frozen=True)
class GreedyPolicy:
    """Takes one step down the ladder at a time, the least quality cost per
    byte freed first over every one-step demotion (KV savings counted at the
    current batch and sequence length), until the plan fits."""

    name: str = "greedy"

    def decide(self, state: PolicyState) -> PruningPlan:
        ladder = Ladder(state.profile)
        plan = PruningPlan.dense(state.profile.config.num_hidden_layers)
        needed = state.predicted_bytes(plan)
        while needed > state.budget_bytes:
            steps = ladder.steps(plan)
            if not steps:
                raise state.infeasible(self.name, plan, "even one kept block does not fit")
            step = min(steps, key=lambda s: ladder.efficiency(state, plan, s))
            needed -= ladder.freed(state, plan, step)
            plan = ladder.take(plan, step)
        return plan


@dataclass
class SearchPolicy:
    """The quality reference: the best plan a search can find by measured
    quality (lower `score` is better, e.g. perplexity), among plans that fit.

    Exhaustive over all keep/drop plans when the model has at most
    `exhaustive_blocks` blocks and the profile's ladder is full-or-dropped;
    otherwise a beam search. Pruning only, it grows plans one dropped block
    at a time and returns the best-scoring plan on the first frontier that
    fits. On the precision ladder, a step's score gain is small next to a
    drop's and the bytes differ by step, so it keeps the `beam_width` plans
    whose score rose least per byte freed, and returns the best-scoring
    fitting plan it met once every beam fits. Expensive by design: it is
    for benchmarks, not for serving."""

    score: Callable[[PruningPlan], float]
    beam_width: int = 4
    exhaustive_blocks: int = 12
    name: str = "search"

    def decide(self, state: PolicyState) -> PruningPlan:
        layers = state.profile.config.num_hidden_layers
        ladder = Ladder(state.profile)
        if ladder.levels != (FULL, DROPPED) or ladder.kv:
            return self._ladder(state, ladder)
        if 2 * layers <= self.exhaustive_blocks:
            return self._exhaustive(state, layers)
        return self._beam(state, layers)

    def _ladder(self, state: PolicyState, ladder: Ladder) -> PruningPlan:
        dense = PruningPlan.dense(state.profile.config.num_hidden_layers)
        dense_bytes = state.predicted_bytes(dense)
        if dense_bytes <= state.budget_bytes:
            return dense
        base = math.log(self.score(dense))

        def rate(plan: PruningPlan) -> float:  # log-score added per byte freed
            return (math.log(self.score(plan)) - base) / max(
                dense_bytes - state.predicted_bytes(plan), 1
            )

        beams: list[PruningPlan] = [dense]
        fitting: list[PruningPlan] = []
        best = math.inf
        while beams:
            children = {ladder.take(plan, step) for plan in beams for step in ladder.steps(plan)}
            fits = {plan: state.fits(plan) for plan in children}
            fitting += [plan for plan in children if fits[plan]]
            best = min([best, *(self.score(plan) for plan in children if fits[plan])])
            beams = sorted((p for p in children if not fits[p]), key=rate)[: self.beam_width]
            # A step never lowers the score: once a fitting plan scores no
            # worse than every open beam, nothing below them can beat it.
            if fitting and (not beams or best <= min(map(self.score, beams))):
                break
        if not fitting:
            smallest = PruningPlan.without_blocks(dense.num_layers, range(dense.num_layers * 2 - 1))
            raise state.infeasible(self.name, smallest, "no plan fits")
        return min(fitting, key=self.score)

    def _exhaustive(self, state: PolicyState, layers: int) -> PruningPlan:
        fitting = []
        for mask in itertools.product((True, False), repeat=2 * layers):
            if any(mask):
                plan = PruningPlan.from_mask(mask)
                if state.fits(plan):
                    fitting.append(plan)
        if not fitting:
            smallest = PruningPlan.without_blocks(layers, range(2 * layers - 1))
            raise state.infeasible(self.name, smallest, "no plan fits")
        return min(fitting, key=self.score)

    def _beam(self, state: PolicyState, layers: int) -> PruningPlan:
        dense = PruningPlan.dense(layers)
        if state.fits(dense):
            return dense
        beams: list[frozenset[int]] = [frozenset()]
        for _depth in range(2 * layers - 1):
            children = sorted(
                {drops | {b} for drops in beams for b in range(2 * layers) if b not in drops},
                key=sorted,
            )
            plans = [PruningPlan.without_blocks(layers, drops) for drops in children]
            fitting = [plan for plan in plans if state.fits(plan)]
            if fitting:
                return min(fitting, key=self.score)
            ranked = sorted(zip(children, plans, strict=True), key=lambda c: self.score(c[1]))
            beams = [drops for drops, _ in ranked[: self.beam_width]]
        raise state.infeasible(
            self.name, PruningPlan.without_blocks(layers, sorted(beams[0])), "no plan fits"
        )
