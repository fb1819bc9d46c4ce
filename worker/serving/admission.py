"""Admission control by KV blocks: which requests may run now without the
worker ever holding more memory than its budget.

The serving loop keeps a paged KV cache (worker/model/kvcache.py): a pool
of blocks of `block_tokens` positions per kept attention block, and a block
table per sequence. The pool's bytes are what the memory model predicts for
`blocks` sequences of `block_tokens` tokens, so the worker holds

    weights + adapters + pool blocks x block bytes  <=  budget

and everything here is arithmetic on `predict_memory`, the memory model the
agent's policies and the operator use, so a plan that the policy says fits a
budget and the worker's admission agree to the byte.

The growth reservation (the documented policy). A running sequence is
charged the blocks for

    min(worst case, tokens it holds after the next step + growth_tokens)

where the worst case is prompt + max_new_tokens (capped by the context):
what it needs now plus a window of growth, never more than it can ever
use. With growth_tokens at or above every max_new_tokens this is the old
worst-case admission; smaller windows admit more sequences, and a sequence
that outgrows its window while the budget has no free block makes the
engine preempt the youngest running sequence (it is recomputed later, its
tokens kept). A request is admitted when the charges of the running
sequences plus its own, plus the scratch block, fit the budget. The pool
holds those charges (rounded up by POOL_STEP, so sequences joining one at
a time do not reallocate it at every join) but never more than the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.memory import BLOCK_TOKENS, blocks_for, predict_memory
from elasticfleet.worker.model.plan import PruningPlan

# The pool grows and shrinks in steps of at least this many blocks, or a
# quarter of its size, so that joins and leaves rarely reallocate it.
POOL_STEP = 16
# The default growth window: 4 blocks of 16 tokens.
GROWTH_TOKENS = 64


@dataclass
class Admission:
    """Memory arithmetic for one model: the budget and how many blocks fit in it."""

    config: ModelConfig
    dtype: object
    budget_bytes: int
    max_rows: int
    growth_tokens: int = GROWTH_TOKENS
    block_tokens: int = BLOCK_TOKENS

    def total_bytes(self, plan: PruningPlan, blocks: int, adapter_bytes: int) -> int:
        """Weights + a pool of `blocks` blocks + adapters, as the memory model predicts."""
        estimate = predict_memory(self.config, plan, blocks, self.block_tokens, self.dtype)
        return estimate.total_bytes + adapter_bytes

    def kv_bytes(self, plan: PruningPlan, blocks: int) -> int:
        """Bytes of `blocks` blocks under a plan (0 when it keeps no attention block)."""
        return predict_memory(self.config, plan, blocks, self.block_tokens, self.dtype).kv_bytes

    def max_blocks(self, plan: PruningPlan, adapter_bytes: int) -> int:
        """The largest pool that fits the budget beside the weights and adapters
        (scratch included; 0 when not even the weights fit). A plan without
        attention blocks stores no KV: a block table still needs the rows'
        worth of blocks, which cost nothing."""
        spare = self.budget_bytes - self.total_bytes(plan, 0, adapter_bytes)
        if spare < 0:
            return 0
        per_block = self.kv_bytes(plan, 1)
        context_blocks = blocks_for(self.config.max_position_embeddings, self.block_tokens)
        everything = 1 + self.max_rows * context_blocks
        return everything if per_block == 0 else min(everything, spare // per_block)

    def worst_case_tokens(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Positions a request can fill: prompt + max_new_tokens, capped by the context."""
        return min(prompt_tokens + max_new_tokens, self.config.max_position_embeddings)

    def charge(self, held_after_step: int, worst_case: int) -> int:
        """Blocks charged to a sequence holding `held_after_step` tokens
        after the next step (the growth reservation, see the module)."""
        tokens = min(worst_case, held_after_step + self.growth_tokens)
        return blocks_for(max(tokens, held_after_step), self.block_tokens)

    def pool_size(self, charged: int, current: int, cap: int) -> int:
        """The pool to hold `charged` blocks plus scratch: the current one
        while it covers them and is at most twice as large, else the need
        rounded up by a step; never above `cap`."""
        needed = charged + 1
        if needed <= current <= 2 * needed:
            return min(current, cap)
        step = max(POOL_STEP, needed // 4)
        return min(-(-needed // step) * step, cap)

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
            candidate = PruningPlan.from_mask(mask)
            if self.total_bytes(candidate, 0, 0) <= self.budget_bytes:
                return candidate
            mask[block] = False
        return None
