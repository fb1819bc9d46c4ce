"""From what a worker reports to what its policy plans for: the memory
budget, the load, and the quality a plan may not fall below.

Budget (docs/architecture.md, "The path of a plan"): of the device's total
memory, what other processes hold is not ours to plan with, nor is the
fleet's headroom; the budget is the spec's fraction of the rest, or its
fixed bytes capped by the rest. So the budget depends only on the others:
it does not shrink because the worker itself grew into the device, nor grow
because it shrank, and a plan that fits it stays in force until the load or
the others' memory changes.

"Other processes" is the device's used memory minus the worker's own, both
from one reading the worker took (GetStats' `device.own_bytes`, from
Engine.snapshot). Figures from different moments count what the worker freed
or took in between as someone else's: "used" from before a plan switch and
the weights from after it, or a finished request's KV cache freed between
the two, and a budget derived from them is too large or too small. The
worker's own is what its process holds on the device, not only its live
tensors: NVML's figure for the process, else the allocator's reserved bytes.
With a caching allocator freed blocks stay reserved, so pruning does not
lower "used"; counting only the tensors, every block dropped would look like
another process growing, and the loop would prune further and further. A
worker that does not report its own bytes is taken to hold its tensors
(weights, reserved KV cache, adapters), as workers were before the field.

Load: the policy plans for the worker's windowed request mix, a high
percentile of running sequences and of prompt plus output tokens, so a plan
anticipates the load of the last window rather than one instant.

Quality: a plan's predicted perplexity relative to the dense model comes
from the model's profile (the measured Greedy Sequential Importance prefixes,
agent.quality.ProfileQuality), the same estimate the RL agent was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.operator.spec import MemoryPolicy
from elasticfleet.worker.model.memory import pooled_positions
from elasticfleet.worker.model.plan import PruningPlan


class BudgetError(ValueError):
    """The device leaves the worker no memory to plan with."""


class QualityFloorError(ValueError):
    """The plan that fits is predicted to be worse than the fleet allows."""


@dataclass(frozen=True)
class DeviceFigures:
    """A worker's device memory and its own share of it, in bytes, read at
    one moment (see the module docstring)."""

    total_bytes: int
    used_bytes: int
    own_bytes: int  # what the worker's process holds of used_bytes

    @property
    def others_bytes(self) -> int:
        """Bytes held by other processes on the device."""
        return max(self.used_bytes - self.own_bytes, 0)


def derive_budget(policy: MemoryPolicy, device: DeviceFigures) -> int:
    """The worker's budget in bytes under `policy` (see the module docstring)."""
    usable = device.total_bytes - device.others_bytes - policy.headroom_bytes
    if usable <= 0:
        raise BudgetError(
            f"no memory left to budget: device {device.total_bytes:,} bytes, others hold "
            f"{device.others_bytes:,}, headroom {policy.headroom_bytes:,}"
        )
    if policy.budget.fraction is not None:
        return max(int(policy.budget.fraction * usable), 1)
    assert policy.budget.bytes is not None  # Budget guarantees one of the two
    return min(policy.budget.bytes, usable)


@dataclass(frozen=True)
class Load:
    """The (batch, sequence) a plan is chosen for: `seq_len` counts the
    positions the worker's paged KV pool holds per sequence, so a plan that
    fits this load fits the worker's admission to the byte."""

    batch_size: int
    seq_len: int


def planned_load(
    batch_size_p90: float, sequence_tokens_p90: float, active_sequences: int, max_seq_len: int
) -> Load:
    """The load to plan for from a worker's request mix. Before any request
    has finished, the sequences running now stand in for the batch; the
    sequence length is capped by the model's context. The worker stores KV
    in whole blocks and keeps a scratch block: planned for the tokens alone,
    a plan that fills its budget would leave a request no room to run."""
    batch = max(math.ceil(batch_size_p90), active_sequences, 1)
    seq = min(max(math.ceil(sequence_tokens_p90), 1), max_seq_len)
    return Load(batch, -(-pooled_positions(batch, seq) // batch))


class QualityFloor:
    """Predicted perplexity ratios of plans, and the fleet's floor on them."""

    def __init__(self, profile: ModelProfile, max_ratio: float | None) -> None:
        self._quality = ProfileQuality(profile)
        self._dense = profile.dense_perplexity
        self.max_ratio = max_ratio

    def ratio(self, plan: PruningPlan) -> float:
        """Predicted perplexity of `plan` over the dense model's (1.0: no loss)."""
        return self._quality(plan) / self._dense

    def check(self, plan: PruningPlan) -> float:
        """The plan's ratio, or QualityFloorError when it exceeds the floor."""
        ratio = self.ratio(plan)
        if self.max_ratio is not None and ratio > self.max_ratio:
            raise QualityFloorError(
                f"the plan that fits ({plan.describe()}) is predicted at {ratio:.2f}x the dense "
                f"perplexity, above the floor of {self.max_ratio:.2f}x: give the workers more "
                f"memory, lower the load, or raise memoryPolicy.qualityFloor.maxPerplexityRatio"
            )
        return ratio
