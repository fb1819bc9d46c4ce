"""What the profile says a plan costs in quality, without running the model.

Two readings of a profile's measurements, shared by the policies (ranking
blocks), the RL agent (features and training rewards) and the operator
(the fleet's quality floor). Plain arithmetic over the profile: no torch, so
the control loop can check a plan's quality without loading the agent.
"""

from __future__ import annotations

import math

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.worker.model.plan import FULL, INT4, INT8, PruningPlan


def block_importance(profile: ModelProfile) -> list[float]:
    """A measured importance per block (block order), for ranking by value per byte.

    Blocks in the Greedy Sequential Importance prefix score the log-perplexity
    their removal added at that step (floored just above zero, so a block
    whose removal helped still costs something). Blocks GSI did not reach
    rank after all of them, ordered by the cheap proxy."""
    scores = [0.0] * len(profile.block_weight_bytes)
    previous = math.log(profile.dense_perplexity)
    ceiling = 0.0
    for block, perplexity in zip(profile.gsi_order, profile.gsi_perplexity, strict=True):
        current = math.log(perplexity)
        scores[block] = max(current - previous, 1e-6)
        ceiling = max(ceiling, scores[block])
        previous = current
    reached = set(profile.gsi_order)
    for block, proxy in enumerate(profile.proxy_scores):
        if block not in reached:
            scores[block] = ceiling + 1e-3 + proxy
    return scores


def level_cost(profile: ModelProfile, level: str, index: int) -> float:
    """What block (or, for kv_int8, layer) `index` at `level` adds to the
    log-perplexity, as measured alone (never below zero: a rounding that
    happened to help on calibration text is not counted as a gain)."""
    if level == FULL:
        return 0.0
    costs = profile.level_costs.get(level)
    if costs is None:
        raise ValueError(
            f"the profile of {profile.model_name} has no {level} costs; measure them with "
            "`elasticfleet agent levels`"
        )
    return max(costs[index], 0.0)


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

    Kept blocks below full precision, and int8 KV caches, multiply that by
    e to the sum of their measured costs (`level_cost`): quantization
    errors are small and nearly independent, so their log-perplexities add.
    """

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        self.rank = {block: i for i, block in enumerate(profile.importance_rank())}
        self.dense = profile.dense_perplexity
        self.prefix = profile.gsi_perplexity

    def __call__(self, plan: PruningPlan) -> float:
        return self.pruned(plan) * math.exp(self.precision_cost(plan))

    def precision_cost(self, plan: PruningPlan) -> float:
        """The log-perplexity the plan's quantized blocks and KV caches add."""
        if plan.pruning_only:
            return 0.0
        cost = sum(
            level_cost(self.profile, level, block)
            for block, level in enumerate(plan.levels())
            if level in (INT8, INT4)
        )
        return cost + sum(
            level_cost(self.profile, "kv_int8", layer)
            for layer, level in enumerate(plan.kv_levels())
            if level == INT8 and plan.keep_attention[layer]
        )

    def pruned(self, plan: PruningPlan) -> float:
        """The estimate for the plan's dropped blocks alone."""
        return self.at_depth(self.deepest(plan))

    def deepest(self, plan: PruningPlan) -> int:
        """The importance rank of the plan's deepest dropped block (-1: none)."""
        return max((self.rank[b] for b, keep in enumerate(plan.to_mask()) if not keep), default=-1)

    def at_depth(self, deepest: int) -> float:
        """The estimate of a plan whose deepest dropped block has rank `deepest`."""
        if deepest < 0:
            return self.dense
        if deepest < len(self.prefix):
            return self.prefix[deepest]
        last = self.prefix[-1] if self.prefix else self.dense
        return last * math.exp(deepest - len(self.prefix) + 1)
