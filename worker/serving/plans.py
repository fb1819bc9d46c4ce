"""How a plan travels over gRPC: keep-mask, block levels and KV levels.

A keep-mask alone is what clients before precision levels send, and still
means full-or-dropped; levels, when given, say more and must agree with a
mask sent beside them. The worker's server and the clients (the operator's
among them) convert through here, so both ends read a plan the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

BLOCK_LEVELS = {
    FULL: pb.BLOCK_LEVEL_FULL,
    INT8: pb.BLOCK_LEVEL_INT8,
    INT4: pb.BLOCK_LEVEL_INT4,
    DROPPED: pb.BLOCK_LEVEL_DROPPED,
}
KV_LEVELS = {FULL: pb.KV_LEVEL_FULL, INT8: pb.KV_LEVEL_INT8}
_BLOCK_NAMES: dict[int, str] = {number: name for name, number in BLOCK_LEVELS.items()}
_KV_NAMES: dict[int, str] = {number: name for name, number in KV_LEVELS.items()}


def level_fields(
    plan: PruningPlan,
) -> tuple[list[pb.BlockLevel.ValueType], list[pb.KvLevel.ValueType]]:
    """A plan's levels and KV levels as messages carry them; both empty for
    a pruning-only plan, so it reads the same to workers that predate levels."""
    if plan.pruning_only:
        return [], []
    return [BLOCK_LEVELS[level] for level in plan.levels()], [
        KV_LEVELS[level] for level in plan.kv_levels()
    ]


def plan_from_fields(
    keep_mask: Sequence[bool],
    levels: Sequence[int],
    kv_levels: Sequence[int],
    num_layers: int | None = None,
) -> PruningPlan:
    """The plan a message's fields describe (ValueError naming the field
    that is malformed)."""
    try:
        names = [_BLOCK_NAMES[number] for number in levels]
    except KeyError as error:
        raise ValueError(f"levels: {error.args[0]} is not a block level") from None
    try:
        kv = [_KV_NAMES[number] for number in kv_levels]
    except KeyError as error:
        raise ValueError(f"kv_levels: {error.args[0]} is not a KV level") from None
    if not names:
        if kv:
            raise ValueError("kv_levels: given without levels")
        try:
            return PruningPlan.from_mask(list(keep_mask), num_layers)
        except ValueError as error:
            raise ValueError(f"keep_mask: {error}") from None
    try:
        plan = PruningPlan.from_levels(names, kv, num_layers)
    except ValueError as error:
        raise ValueError(f"levels: {error}") from None
    if keep_mask and list(keep_mask) != plan.to_mask():
        raise ValueError("keep_mask disagrees with levels (kept means not dropped)")
    return plan
