"""Admission control: which requests may run now without the worker ever
holding more memory than its budget.

The serving loop keeps one rectangular KV tensor per kept attention block,
[rows, kv_heads, capacity, head_dim], so that a decode step reads the cache
in place. Its size is therefore what the memory model predicts for `rows`
sequences of `capacity` tokens, and that is what admission charges: a
request is admitted only if the cache laid out for the running requests plus
it (one more row; capacity at least its prompt + max_new_tokens, its worst
case) fits the budget together with the kept weights and the adapters. With
requests of similar length that is each request's worst-case KV; a long
request makes every row as long as itself, and admission counts that too,
because that is the memory really reserved.

Everything here is arithmetic on `predict_memory`, the memory model the
agent's policies and the operator use, so a plan the policy says fits a
budget and the worker's admission agree to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

# Layouts grow in these steps so that requests joining one at a time do not
# reallocate (and copy) the cache at every join.
ROW_STEP = 8
CAPACITY_STEP = 64


@dataclass(frozen=True)
class Layout:
    """Shape of the KV cache: sequence rows by token positions."""

    rows: int
    capacity: int

    def covers(self, other: Layout) -> bool:
        return self.rows >= other.rows and self.capacity >= other.capacity


def _round_up(value: int, step: int, limit: int) -> int:
    return min(-(-value // step) * step, max(limit, value))


@dataclass
class Admission:
    """Memory arithmetic for one model: the budget and what fits in it."""

    config: ModelConfig
    dtype: object
    budget_bytes: int
    max_rows: int

    def total_bytes(self, plan: PruningPlan, layout: Layout | None, adapter_bytes: int) -> int:
        """Weights + KV of `layout` + adapters, as the memory model predicts."""
        rows, capacity = (0, 0) if layout is None else (layout.rows, layout.capacity)
        estimate = predict_memory(self.config, plan, rows, capacity, self.dtype)
        return estimate.total_bytes + adapter_bytes

    def fits(self, plan: PruningPlan, layout: Layout | None, adapter_bytes: int) -> bool:
        return self.total_bytes(plan, layout, adapter_bytes) <= self.budget_bytes

    def kv_bytes(self, plan: PruningPlan, layout: Layout | None) -> int:
        """KV bytes of a layout under a plan."""
        if layout is None:
            return 0
        estimate = predict_memory(self.config, plan, layout.rows, layout.capacity, self.dtype)
        return estimate.kv_bytes

    def worst_case_tokens(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Positions a request can fill: prompt + max_new_tokens, capped by the context."""
        return min(prompt_tokens + max_new_tokens, self.config.max_position_embeddings)

    def layout_for(
        self,
        plan: PruningPlan,
        needed: Layout,
        adapter_bytes: int,
        current: Layout | None,
    ) -> Layout | None:
        """The layout to hold `needed`, or None when even the exact layout
        does not fit the budget.

        Keeps the current layout when it covers the need and fits; otherwise
        grows to the need rounded up (fewer reallocations), falling back to
        the exact need when the rounded layout would not fit; shrinks when
        the current layout is more than twice what is needed."""
        if (
            current is not None
            and current.covers(needed)
            and self.fits(plan, current, adapter_bytes)
        ):
            wasted = current.rows * current.capacity > 2 * needed.rows * needed.capacity
            if not wasted:
                return current
        rounded = Layout(
            _round_up(needed.rows, ROW_STEP, self.max_rows),
            _round_up(needed.capacity, CAPACITY_STEP, self.config.max_position_embeddings),
        )
        for layout in (rounded, needed):
            if self.fits(plan, layout, adapter_bytes):
                return layout
        return None

    def start_plan(self, plan: PruningPlan) -> PruningPlan | None:
        """A plan whose weights fit the budget for a worker to start with:
        `plan` itself, else `plan` with blocks dropped from the deepest up
        (each layer's FFN, then its attention: RAP finds deep blocks the
        cheapest to lose), or None when not even the fixed weights fit.

        A worker whose budget comes from the device can find it squeezed
        when it starts (a crashed pod restarting beside processes that took
        its memory). Refusing to start would leave it down until the memory
        came back, out of the operator's reach; started under a smaller
        plan, it serves and the operator's next tick gives it the policy's
        plan for that budget."""
        mask = plan.to_mask()
        for block in reversed(range(len(mask))):
            if self.fits(PruningPlan.from_mask(mask), None, 0):
                return PruningPlan.from_mask(mask)
            mask[block] = False
        return None
