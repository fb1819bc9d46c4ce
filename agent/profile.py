"""The model profile: what the pruning policies know about a model's blocks.

A policy decides which of the 2L blocks to drop under a memory budget. For
that it needs, per block, what dropping it saves (weight bytes, and KV bytes
per token for attention blocks) and what it costs (how much worse the model
gets). Measuring the cost needs the model and a corpus and takes a long
time (`elasticfleet.agent.profiling`); using it must not. So the measurement
happens once, offline, and its result is this small JSON file, which a policy,
the operator (and a person reviewing a change) can read without torch or the
weights. This module is that record: no torch, no model.

The cost is ranked two ways (profiling.py says how each is measured): by
Greedy Sequential Importance (RAP, arXiv 2505.17138), which may cover only a
prefix of the blocks, and by a one-pass proxy that ranks the rest
(`ModelProfile.importance_rank`).

The byte figures come from worker/model/memory.py, the one memory model the
system uses, and a loaded profile must agree with it.

A profile may also hold each block's cost at the precision levels below full
(`level_costs`: the log-perplexity that putting that one block, alone, at
int8 or int4 adds to the dense model's), which the ladder's policies read;
a profile without them plans pruning only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.memory import (
    attention_block_params,
    dtype_bytes,
    ffn_block_params,
    kv_bytes_per_token,
)

PROFILE_FORMAT = "elasticfleet-model-profile"
FORMAT_VERSION = 1

_FIELDS = (
    "model_name",
    "config",
    "dtype",
    "block_weight_bytes",
    "block_kv_bytes_per_token",
    "dense_perplexity",
    "gsi_order",
    "gsi_perplexity",
    "proxy_order",
    "proxy_scores",
    "eval_tokens",
    "meta",
)
#: Fields a profile may lack (profiles written before they existed).
_OPTIONAL = ("level_costs",)
#: The levels `level_costs` may hold: a block's weights, or (per layer) its KV cache.
COST_LEVELS = ("int8", "int4", "kv_int8")


#: The committed profile of the shipped model, the policies' default. Resolved
#: through symlinks so an editable install writes into the source tree.
DEFAULT_PROFILE = Path(__file__).resolve().parent / "profiles" / "SmolLM2-135M-Instruct.json"


def block_name(block: int) -> str:
    """A block's human name: block 2i is 'attn i', block 2i+1 'ffn i'."""
    return f"{'attn' if block % 2 == 0 else 'ffn'} {block // 2}"


def block_bytes(config: ModelConfig, dtype: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per block, in block order: weight bytes, and KV-cache bytes per token
    (zero for FFN blocks, which hold no KV), from the memory model."""
    per = dtype_bytes(dtype)
    attention = attention_block_params(config) * per
    ffn = ffn_block_params(config) * per
    kv = kv_bytes_per_token(config, dtype)
    layers = config.num_hidden_layers
    return (attention, ffn) * layers, (kv, 0) * layers


@dataclass(frozen=True)
class ModelProfile:
    """Per-block memory figures and importance rankings of one model.

    Blocks are numbered as in PruningPlan: 2i is layer i's attention block,
    2i+1 its FFN block. Construction validates every field (ValueError)."""

    model_name: str
    config: ModelConfig  # serialised as its to_hf_dict()
    dtype: str  # "float32"
    block_weight_bytes: tuple[int, ...]  # 2L entries in block order
    block_kv_bytes_per_token: tuple[int, ...]  # 2L entries; FFN blocks 0
    dense_perplexity: float
    # Greedy Sequential Importance: blocks in removal order, least important
    # first; shorter than 2L - 1 when the run was step- or time-bounded.
    gsi_order: tuple[int, ...]
    gsi_perplexity: tuple[float, ...]  # perplexity after removing gsi_order[:k+1]
    proxy_order: tuple[int, ...]  # all 2L blocks, least important first
    proxy_scores: tuple[float, ...]  # per block (block order), higher = more important
    eval_tokens: int  # tokens the perplexities were measured on
    meta: dict[str, Any]  # command, seed, corpus digest, timings, complete flag
    # Per level in COST_LEVELS: the log-perplexity one block (2L entries; for
    # kv_int8 one attention block's cache, L entries) adds at that level alone.
    level_costs: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def complete(self) -> bool:
        """Whether GSI ran to the end (all but one block ranked)."""
        return len(self.gsi_order) == self.num_blocks - 1

    def importance_rank(self) -> list[int]:
        """All 2L blocks, least important first: the GSI order, then the
        blocks GSI did not reach in proxy order."""
        ranked = set(self.gsi_order)
        return [*self.gsi_order, *(b for b in self.proxy_order if b not in ranked)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form that `save` writes."""
        return {
            "format": PROFILE_FORMAT,
            "version": FORMAT_VERSION,
            "model_name": self.model_name,
            "config": self.config.to_hf_dict(),
            "dtype": self.dtype,
            "block_weight_bytes": list(self.block_weight_bytes),
            "block_kv_bytes_per_token": list(self.block_kv_bytes_per_token),
            "dense_perplexity": self.dense_perplexity,
            "gsi_order": list(self.gsi_order),
            "gsi_perplexity": list(self.gsi_perplexity),
            "proxy_order": list(self.proxy_order),
            "proxy_scores": list(self.proxy_scores),
            "eval_tokens": self.eval_tokens,
            "meta": self.meta,
        } | (
            {"level_costs": {k: list(v) for k, v in self.level_costs.items()}}
            if self.level_costs
            else {}
        )

    @classmethod
    def from_dict(cls, raw: object) -> ModelProfile:
        """Parse and validate the form `to_dict` returns (ValueError if malformed)."""
        if not isinstance(raw, dict):
            raise ValueError(f"a profile must be a JSON object, got {type(raw).__name__}")
        if raw.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a model profile: 'format' is {raw.get('format')!r}")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"profile format version {raw.get('version')!r} is not supported "
                f"(this code reads version {FORMAT_VERSION}); re-run the profiling"
            )
        missing = [name for name in _FIELDS if name not in raw]
        if missing:
            raise ValueError(f"profile lacks field(s) {', '.join(missing)}")
        unknown = sorted(set(raw) - set(_FIELDS) - set(_OPTIONAL) - {"format", "version"})
        if unknown:
            raise ValueError(f"profile has unknown field(s) {', '.join(unknown)}")
        if not isinstance(raw["config"], dict):
            raise ValueError("profile field config must be a JSON object (a config.json)")
        try:
            config = ModelConfig.from_hf_dict(raw["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"profile field config is not a valid model config: {error}") from None
        meta = raw["meta"]
        if not isinstance(meta, dict):
            raise ValueError("profile field meta must be a JSON object")
        return cls(
            model_name=_str(raw, "model_name"),
            config=config,
            dtype=_str(raw, "dtype"),
            block_weight_bytes=_ints(raw, "block_weight_bytes"),
            block_kv_bytes_per_token=_ints(raw, "block_kv_bytes_per_token"),
            dense_perplexity=_float(raw, "dense_perplexity"),
            gsi_order=_ints(raw, "gsi_order"),
            gsi_perplexity=_floats(raw, "gsi_perplexity"),
            proxy_order=_ints(raw, "proxy_order"),
            proxy_scores=_floats(raw, "proxy_scores"),
            eval_tokens=_int(raw, "eval_tokens"),
            meta=meta,
            level_costs=_level_costs(raw.get("level_costs", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (sorted keys, one list entry a line)."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        """Read and validate a profile; ValueError names the file and the problem."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        try:
            return cls.from_dict(raw)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


# -- validation -------------------------------------------------------------


def _str(raw: dict[str, Any], name: str) -> str:
    value = raw[name]
    if not isinstance(value, str):
        raise ValueError(f"profile field {name} must be a string, got {value!r}")
    return value


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"profile field {name} must be an integer, got {value!r}")
    return value


def _float(raw: dict[str, Any], name: str) -> float:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"profile field {name} must be a number, got {value!r}")
    return float(value)


def _ints(raw: dict[str, Any], name: str) -> tuple[int, ...]:
    values = raw[name]
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in values
    ):
        raise ValueError(f"profile field {name} must be a list of integers")
    return tuple(values)


def _floats(raw: dict[str, Any], name: str) -> tuple[float, ...]:
    values = raw[name]
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int | float) for v in values
    ):
        raise ValueError(f"profile field {name} must be a list of numbers")
    return tuple(float(v) for v in values)


def _level_costs(raw: object) -> dict[str, tuple[float, ...]]:
    if not isinstance(raw, dict):
        raise ValueError("profile field level_costs must be a JSON object")
    return {str(level): _floats(raw, level) for level in raw}


def _check_perplexity(name: str, value: float, *, allow_inf: bool) -> None:
    # Mean NLL is non-negative, so a perplexity is at least 1; an evaluation
    # that overflowed is +inf (ranks last), never NaN.
    if math.isnan(value) or value < 1.0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a perplexity (a number >= 1), got {value!r}")


def _validate(profile: ModelProfile) -> None:
    config = profile.config
    blocks = config.num_blocks
    layers = config.num_hidden_layers
    if not profile.model_name:
        raise ValueError("profile model_name is empty")
    try:
        weights, kv = block_bytes(config, profile.dtype)
    except ValueError as error:
        raise ValueError(f"profile dtype: {error}") from None

    def check_length(name: str, values: Sequence[object], expected: int) -> None:
        if len(values) != expected:
            raise ValueError(
                f"profile {name} has {len(values)} entries; a {layers}-layer model has "
                f"{blocks} blocks, so it needs {expected}"
            )

    for name, values, expected in (
        ("block_weight_bytes", profile.block_weight_bytes, weights),
        ("block_kv_bytes_per_token", profile.block_kv_bytes_per_token, kv),
    ):
        check_length(name, values, blocks)
        if tuple(values) != expected:
            raise ValueError(
                f"profile {name} disagrees with the memory model for this config and dtype "
                f"(expected {list(expected[:2])} per layer, got {list(values[:2])} for layer 0); "
                "the file is stale or edited: re-run the profiling"
            )
    _check_perplexity("profile dense_perplexity", profile.dense_perplexity, allow_inf=False)

    if len(profile.gsi_order) > blocks - 1:
        raise ValueError(
            f"profile gsi_order has {len(profile.gsi_order)} entries; at most {blocks - 1} "
            f"(all but one of the {blocks} blocks) can be removed"
        )
    _check_blocks("gsi_order", profile.gsi_order, blocks)
    if len(profile.gsi_perplexity) != len(profile.gsi_order):
        raise ValueError(
            f"profile gsi_perplexity has {len(profile.gsi_perplexity)} entries but gsi_order "
            f"has {len(profile.gsi_order)}; they must be the same length"
        )
    for step, value in enumerate(profile.gsi_perplexity):
        _check_perplexity(f"profile gsi_perplexity[{step}]", value, allow_inf=True)

    check_length("proxy_order", profile.proxy_order, blocks)
    _check_blocks("proxy_order", profile.proxy_order, blocks)
    check_length("proxy_scores", profile.proxy_scores, blocks)
    for block, score in enumerate(profile.proxy_scores):
        if not 0.0 <= score <= 2.0:  # 1 - cos lies in [0, 2]; NaN fails too
            raise ValueError(f"profile proxy_scores[{block}] must lie in [0, 2], got {score!r}")
    ordered = [profile.proxy_scores[b] for b in profile.proxy_order]
    if any(a > b for a, b in itertools.pairwise(ordered)):
        raise ValueError("profile proxy_order is not sorted by proxy_scores, least important first")

    if isinstance(profile.eval_tokens, bool) or profile.eval_tokens < 1:
        raise ValueError(
            f"profile eval_tokens must be a positive integer, got {profile.eval_tokens}"
        )
    if not isinstance(profile.meta, dict) or not all(isinstance(k, str) for k in profile.meta):
        raise ValueError("profile meta must be a dictionary with string keys")
    for level, costs in profile.level_costs.items():
        if level not in COST_LEVELS:
            raise ValueError(f"profile level_costs has level {level!r}; levels are {COST_LEVELS}")
        check_length(f"level_costs[{level}]", costs, layers if level == "kv_int8" else blocks)
        if not all(math.isfinite(cost) for cost in costs):
            raise ValueError(f"profile level_costs[{level}] must hold finite numbers")


def _check_blocks(name: str, values: Sequence[int], blocks: int) -> None:
    seen: set[int] = set()
    for value in values:
        if not 0 <= value < blocks:
            raise ValueError(
                f"profile {name} holds block {value}, out of range: blocks are 0..{blocks - 1}"
            )
        if value in seen:
            raise ValueError(f"profile {name} lists block {value} twice")
        seen.add(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename), so an interrupted
    write never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
