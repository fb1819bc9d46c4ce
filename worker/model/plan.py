"""Plans: the level each of a model's 2L blocks is served at.

Block numbering follows the forward pass: block 2*i is layer i's attention
block and block 2*i+1 is layer i's FFN block. A plan is immutable and
validated on construction, so any code holding a plan can trust it.

Each block stands on a ladder of levels, each step freeing memory at some
cost in quality: `full` (the serving dtype), `int8` and `int4` weight-only
quantization, and `dropped`. Each kept attention block's KV cache has its
own level, `full` or `int8`. A plan that quantizes nothing is exactly the
keep/drop plan of pruning, so a keep-mask still means full-or-dropped
everywhere (gRPC, status, policies): the precision fields are empty then,
which keeps equality and hashing of pruning-only plans as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

FULL = "full"
INT8 = "int8"
INT4 = "int4"
DROPPED = "dropped"
#: A block's ladder, in demotion order: each step holds fewer bytes.
WEIGHT_LEVELS = (FULL, INT8, INT4, DROPPED)
#: The levels of a kept block's weights.
KEPT_LEVELS = (FULL, INT8, INT4)
#: An attention block's KV-cache ladder.
KV_LEVELS = (FULL, INT8)

#: One demotion: ("block", b) moves block b one step down its ladder,
#: ("kv", i) moves layer i's KV cache from full to int8.
Step = tuple[Literal["block", "kv"], int]


@dataclass(frozen=True)
class PruningPlan:
    """Keep (True) or drop (False) for every attention and FFN block, the
    precision of each kept block's weights (block order; empty: all full)
    and of each kept attention block's KV cache (layer order; empty: all
    full). Dropped blocks read as full in both, so one plan has one form."""

    keep_attention: tuple[bool, ...]
    keep_ffn: tuple[bool, ...]
    precision: tuple[str, ...] = ()
    kv_precision: tuple[str, ...] = ()

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
        mask = self.to_mask()
        precision = _normalised("precision", self.precision, KEPT_LEVELS, mask)
        kv = _normalised("kv_precision", self.kv_precision, KV_LEVELS, list(self.keep_attention))
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "kv_precision", kv)

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

    @classmethod
    def from_levels(
        cls, levels: Sequence[str], kv_levels: Sequence[str] = (), num_layers: int | None = None
    ) -> PruningPlan:
        """A plan from each block's level (block order, one of WEIGHT_LEVELS)
        and optionally each layer's KV level (KV_LEVELS; empty: all full)."""
        unknown = [level for level in levels if level not in WEIGHT_LEVELS]
        if unknown:
            raise ValueError(f"unknown block level {unknown[0]!r}; levels are {WEIGHT_LEVELS}")
        mask = [level != DROPPED for level in levels]
        base = cls.from_mask(mask, num_layers)
        precision = tuple(FULL if level == DROPPED else level for level in levels)
        return cls(base.keep_attention, base.keep_ffn, precision, tuple(kv_levels))

    def levels(self) -> list[str]:
        """Each block's level in block order (one of WEIGHT_LEVELS)."""
        return [self.weight_level(b) for b in range(2 * self.num_layers)]

    def weight_level(self, block: int) -> str:
        """Block `block`'s level: dropped, or the precision of its weights."""
        kept = self.keep_attention if block % 2 == 0 else self.keep_ffn
        if not kept[block // 2]:
            return DROPPED
        return self.precision[block] if self.precision else FULL

    def kv_level(self, layer: int) -> str:
        """The level of layer `layer`'s KV cache (full for a dropped attention block)."""
        return self.kv_precision[layer] if self.kv_precision else FULL

    def kv_levels(self) -> list[str]:
        """Each layer's KV level (dropped attention blocks read full)."""
        return [self.kv_level(i) for i in range(self.num_layers)]

    @property
    def pruning_only(self) -> bool:
        """Whether every kept block and KV cache is at full precision."""
        return not self.precision and not self.kv_precision

    def demotions(self, ladder: Sequence[str] = WEIGHT_LEVELS, kv: bool = True) -> list[Step]:
        """Every one-step move down `ladder` (a subsequence of WEIGHT_LEVELS
        from full to dropped) this plan allows: each kept block one rung
        down (dropping only while another block stays), and with `kv` each
        kept full-precision KV cache to int8."""
        levels = self.levels()
        last = self.kept_blocks == 1
        steps: list[Step] = [
            ("block", b)
            for b, level in enumerate(levels)
            if level != DROPPED and not (last and ladder[ladder.index(level) + 1] == DROPPED)
        ]
        if kv:
            steps += [
                ("kv", i)
                for i, keep in enumerate(self.keep_attention)
                if keep and self.kv_level(i) == FULL
            ]
        return steps

    def demote(self, step: Step, ladder: Sequence[str] = WEIGHT_LEVELS) -> PruningPlan:
        """This plan with one step of `demotions` taken."""
        kind, index = step
        if kind == "kv":
            kv = self.kv_levels()
            kv[index] = INT8
            return PruningPlan.from_levels(self.levels(), kv)
        levels = self.levels()
        levels[index] = ladder[ladder.index(levels[index]) + 1]
        return PruningPlan.from_levels(levels, self.kv_levels())

    def meet(self, other: PruningPlan) -> PruningPlan | None:
        """Each block at the lower of its two levels (the one that holds
        fewer bytes), each KV cache likewise: the plan to pass through when
        switching between the two without memory peaking above either.
        None when that keeps no block."""
        rank = WEIGHT_LEVELS.index
        levels = [max(a, b, key=rank) for a, b in zip(self.levels(), other.levels(), strict=True)]
        if all(level == DROPPED for level in levels):
            return None
        kv = [
            INT8 if INT8 in pair else FULL
            for pair in zip(self.kv_levels(), other.kv_levels(), strict=True)
        ]
        return PruningPlan.from_levels(levels, kv)

    def level_counts(self) -> dict[str, int]:
        """How many blocks stand at each level, and how many KV caches are int8."""
        levels = self.levels()
        counts = {level: levels.count(level) for level in WEIGHT_LEVELS}
        counts["kv_int8"] = self.kv_levels().count(INT8)
        return counts

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
        counts = self.level_counts()
        precision = ""
        if not self.pruning_only:
            precision = (
                f" ({counts[INT8]} int8, {counts[INT4]} int4; "
                f"KV int8 in {counts['kv_int8']} layers)"
            )
        return (
            f"{kept}/{2 * self.num_layers} blocks kept{precision}; "
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


def _normalised(
    name: str, values: Sequence[str], allowed: Sequence[str], kept: Sequence[bool]
) -> tuple[str, ...]:
    """`values` checked against `allowed` and the plan's length, with entries
    of dropped blocks set to full; () when every entry is full."""
    if not values:
        return ()
    if len(values) != len(kept):
        raise ValueError(f"plan {name} has {len(values)} entries; the plan has {len(kept)}")
    for value in values:
        if value not in allowed:
            raise ValueError(f"plan {name} holds {value!r}; allowed are {tuple(allowed)}")
    result = tuple(value if keep else FULL for value, keep in zip(values, kept, strict=True))
    return () if all(value == FULL for value in result) else result
