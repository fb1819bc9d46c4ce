"""Pruning plans: which of a model's 2L blocks to keep.

Block numbering follows the forward pass: block 2*i is layer i's attention
block and block 2*i+1 is layer i's FFN block. A plan is immutable and
validated on construction, so any code holding a plan can trust it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PruningPlan:
    """Keep (True) or drop (False) for every attention and FFN block."""

    keep_attention: tuple[bool, ...]
    keep_ffn: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.keep_attention) != len(self.keep_ffn):
            raise ValueError(
                f"plan has {len(self.keep_attention)} attention flags but "
                f"{len(self.keep_ffn)} FFN flags; both must equal the number of layers"
            )
        if not self.keep_attention:
            raise ValueError("plan has no layers")
        if not any(self.keep_attention) and not any(self.keep_ffn):
            raise ValueError("plan drops every block; at least one block must be kept")

    @property
    def num_layers(self) -> int:
        return len(self.keep_attention)

    @classmethod
    def dense(cls, num_layers: int) -> PruningPlan:
        """The keep-everything plan."""
        return cls((True,) * num_layers, (True,) * num_layers)

    @classmethod
    def from_dropped(
        cls,
        num_layers: int,
        attention: Iterable[int] = (),
        ffn: Iterable[int] = (),
    ) -> PruningPlan:
        """A plan that drops the given layer indices' attention and FFN blocks."""
        drop_attn = _index_set("attention block", attention, num_layers)
        drop_ffn = _index_set("FFN block", ffn, num_layers)
        return cls(
            tuple(i not in drop_attn for i in range(num_layers)),
            tuple(i not in drop_ffn for i in range(num_layers)),
        )

    @classmethod
    def without_blocks(cls, num_layers: int, blocks: Iterable[int]) -> PruningPlan:
        """The plan that drops exactly `blocks` (block numbers, 0..2L-1)."""
        dropped = _index_set("block", blocks, 2 * num_layers, unit="blocks")
        return cls.from_mask([b not in dropped for b in range(2 * num_layers)])

    @classmethod
    def from_mask(cls, mask: Sequence[bool], num_layers: int | None = None) -> PruningPlan:
        """A plan from a 2L keep-mask in block order (attention 2i, FFN 2i+1)."""
        if len(mask) % 2 or not mask:
            raise ValueError(f"keep-mask length must be a positive even number, got {len(mask)}")
        if num_layers is not None and len(mask) != 2 * num_layers:
            raise ValueError(
                f"keep-mask has {len(mask)} entries but the model has {2 * num_layers} blocks"
            )
        flags = [bool(m) for m in mask]
        return cls(tuple(flags[0::2]), tuple(flags[1::2]))

    def to_mask(self) -> list[bool]:
        """The 2L keep-mask in block order."""
        return [
            flag for pair in zip(self.keep_attention, self.keep_ffn, strict=True) for flag in pair
        ]

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError unless this plan is for a model with num_layers layers."""
        if self.num_layers != num_layers:
            raise ValueError(
                f"plan is for {self.num_layers} layers but the model has {num_layers} "
                f"({2 * num_layers} blocks)"
            )

    @property
    def dropped_attention(self) -> list[int]:
        return [i for i, keep in enumerate(self.keep_attention) if not keep]

    @property
    def dropped_ffn(self) -> list[int]:
        return [i for i, keep in enumerate(self.keep_ffn) if not keep]

    @property
    def kept_blocks(self) -> int:
        return sum(self.keep_attention) + sum(self.keep_ffn)

    def describe(self) -> str:
        """A short human-readable summary, e.g. for logs and the CLI."""
        kept = self.kept_blocks
        return (
            f"{kept}/{2 * self.num_layers} blocks kept; "
            f"attention dropped {self.dropped_attention or 'none'}, "
            f"FFN dropped {self.dropped_ffn or 'none'}"
        )


def _index_set(kind: str, indices: Iterable[int], count: int, unit: str = "layers") -> set[int]:
    result = set()
    for index in indices:
        if not 0 <= index < count:
            raise ValueError(f"{kind} index {index} is out of range; {unit} are 0..{count - 1}")
        result.add(index)
    return result
