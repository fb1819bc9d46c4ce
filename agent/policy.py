"""Pruning policies: given a memory budget and the load, which blocks to keep.

Every policy answers the same question through one interface: from a
`PolicyState` (budget in bytes, batch size, sequence length, current plan and
the model's profile) return a `PruningPlan` whose predicted bytes (the shared
memory model, `predict_memory`) fit the budget, or raise `NoFeasiblePlan`
saying why none can. Policies have no Kubernetes or gRPC imports: the worker,
the operator and the benchmarks all call them the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.quality import block_importance
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan


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
        estimate = predict_memory(config, plan, self.batch_size, self.seq_len, self.profile.dtype)
        return estimate.total_bytes

    def fits(self, plan: PruningPlan) -> bool:
        return self.predicted_bytes(plan) <= self.budget_bytes

    def block_savings(self, block: int) -> int:
        """Bytes freed by dropping `block` at this load: its weights, plus for an
        attention block its KV cache at batch x sequence."""
        per_token = self.profile.block_kv_bytes_per_token[block]
        return self.profile.block_weight_bytes[block] + per_token * self.batch_size * self.seq_len

    def infeasible(self, policy: str, plan: PruningPlan, detail: str) -> NoFeasiblePlan:
        return NoFeasiblePlan(
            f"{policy} policy: {detail}; its best plan ({plan.describe()}) needs "
            f"{self.predicted_bytes(plan):,} bytes at batch {self.batch_size} x "
            f"{self.seq_len} tokens, budget is {self.budget_bytes:,} bytes"
        )


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
    """One pruning ratio chosen offline: drop that share of blocks, least
    important first, whatever the load."""

    ratio: float
    name: str = "static"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"static pruning ratio must be in [0, 1), got {self.ratio}")

    def plan(self, profile: ModelProfile) -> PruningPlan:
        """The one plan this policy ever returns for `profile`."""
        layers = profile.config.num_hidden_layers
        count = min(round(self.ratio * 2 * layers), 2 * layers - 1)
        return PruningPlan.without_blocks(layers, profile.importance_rank()[:count])

    def decide(self, state: PolicyState) -> PruningPlan:
        plan = self.plan(state.profile)
        if not state.fits(plan):
            raise state.infeasible(self.name, plan, f"its fixed ratio {self.ratio:.0%} is too low")
        return plan


@dataclass(frozen=True)
class GreedyPolicy:
    """Drops blocks one at a time, the least importance per byte freed first
    (KV savings counted at the current batch and sequence length), until the
    plan fits."""

    name: str = "greedy"

    def decide(self, state: PolicyState) -> PruningPlan:
        profile = state.profile
        layers = profile.config.num_hidden_layers
        importance = block_importance(profile)
        order = sorted(
            range(2 * layers), key=lambda b: importance[b] / max(state.block_savings(b), 1)
        )
        dropped: list[int] = []
        plan = PruningPlan.dense(layers)
        for block in order[:-1]:  # always keep at least one block
            if state.fits(plan):
                return plan
            dropped.append(block)
            plan = PruningPlan.without_blocks(layers, dropped)
        if state.fits(plan):
            return plan
        raise state.infeasible(self.name, plan, "even one kept block does not fit")


@dataclass
class SearchPolicy:
    """The quality reference: the best plan a search can find by measured
    quality (lower `score` is better, e.g. perplexity), among plans that fit.

    Exhaustive over all plans when the model has at most `exhaustive_blocks`
    blocks; otherwise a beam search that grows plans one dropped block at a
    time and returns the best-scoring plan on the first frontier that fits.
    Expensive by design: it is for benchmarks, not for serving."""

    score: Callable[[PruningPlan], float]
    beam_width: int = 4
    exhaustive_blocks: int = 12
    name: str = "search"

    def decide(self, state: PolicyState) -> PruningPlan:
        layers = state.profile.config.num_hidden_layers
        if 2 * layers <= self.exhaustive_blocks:
            return self._exhaustive(state, layers)
        return self._beam(state, layers)

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
