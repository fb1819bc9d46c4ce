"""The model profile: what the pruning policies know about a model's blocks.

A policy decides which of the 2L blocks to drop under a memory budget. For
that it needs, per block, what dropping it saves (weight bytes, and KV bytes
per token for attention blocks) and what it costs (how much worse the model
gets). Measuring the cost needs the model and a corpus and takes a long
time; using it must not. So the measurement happens once, offline, and its
result is this small JSON file, which a policy (and a person reviewing a
change) can read without torch or the weights.

The cost is ranked two ways:

- Greedy Sequential Importance (RAP, arXiv 2505.17138): from the dense
  model, try dropping each remaining block, keep the drop that hurts
  perplexity least, repeat. It accounts for interactions between blocks
  (dropping one block changes how much the next one matters), but it costs
  2L + (2L - 1) + ... perplexity evaluations, hours for SmolLM2's 60 blocks
  on two CPU cores. So `profile_model` checkpoints after every evaluation,
  resumes from the checkpoint, and can stop at a step or time limit; a
  profile may therefore hold only a prefix of the GSI order.
- A one-pass proxy (ShortGPT's Block Influence): how much each block turns
  the residual stream, 1 - cos(h_in, h_in + block(h_in)), averaged over
  tokens of the dense model. Cheap and complete, it ranks the blocks GSI has
  not reached yet (`ModelProfile.importance_rank`).

The byte figures come from worker/model/memory.py, the one memory model the
system uses, and a loaded profile must agree with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from elasticfleet.agent.perplexity import PerplexityEvaluator, check_tokens, tokens_digest
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import (
    attention_block_params,
    dtype_bytes,
    ffn_block_params,
    kv_bytes_per_token,
)
from elasticfleet.worker.model.plan import PruningPlan

log = logging.getLogger(__name__)

PROFILE_FORMAT = "elasticfleet-model-profile"
CHECKPOINT_FORMAT = "elasticfleet-gsi-checkpoint"
FORMAT_VERSION = 1

# A resumed run re-measures the dense perplexity; if it differs from the
# checkpoint's by more than this (relative), the checkpoint is for other
# weights and is not continued. Packed and plain layouts agree far closer.
_RESUME_TOLERANCE = 1e-4

# The clock of time limits (a module attribute so tests can drive it).
_clock = time.monotonic

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
        }

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
        unknown = sorted(set(raw) - set(_FIELDS) - {"format", "version"})
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
        )

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (sorted keys, one list entry a line)."""
        _write_json(Path(path), self.to_dict())

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


# -- the one-pass proxy -----------------------------------------------------


@contextlib.contextmanager
def _residual_probes(model: ElasticLlama, sums: list[float]) -> Iterator[None]:
    """Hooks that add, for every block and every token of each forward pass,
    cos(h_in, h_in + block(h_in)) to sums[block].

    The residual stream entering a block is the input of its norm (a
    pre-hook there); the block's output is what gets added to it (a forward
    hook on the attention or MLP module). Hooks are removed on exit."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def probe(block: int, norm: nn.Module, body: nn.Module) -> None:
        residual: list[torch.Tensor] = []

        def before(_module: nn.Module, args: tuple[Any, ...]) -> None:
            residual[:] = [args[0]]  # [B, T, hidden]

        def after(_module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> None:
            h_in = residual.pop()
            cos = F.cosine_similarity(h_in.float(), (h_in + output).float(), dim=-1)  # [B, T]
            sums[block] += float(cos.clamp(-1.0, 1.0).double().sum())

        handles.append(norm.register_forward_pre_hook(before))
        handles.append(body.register_forward_hook(after))

    try:
        for index in range(model.config.num_hidden_layers):
            layer = model.layer(index)
            parts = (
                (layer.input_layernorm, layer.self_attn),
                (layer.post_attention_layernorm, layer.mlp),
            )
            for offset, (norm, body) in enumerate(parts):
                if norm is None or body is None:
                    raise ValueError("the proxy needs every block; apply the dense plan first")
                probe(2 * index + offset, norm, body)
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_proxy_scores(
    model: ElasticLlama, tokens: torch.Tensor, batch_size: int = 8
) -> tuple[float, ...]:
    """Per block (block order): 1 - mean over all tokens of the cosine
    similarity between the residual stream before and after the block, on
    the dense model. Lies in [0, 2]; higher means the block changes more,
    taken as more important.

    The model is switched to the dense plan if it is not dense, and left so."""
    config = model.config
    tokens = check_tokens(tokens, config.vocab_size, config.max_position_embeddings)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dense = PruningPlan.dense(config.num_hidden_layers)
    if model.plan != dense:
        model.apply_plan(dense)
    sums = [0.0] * config.num_blocks
    with _residual_probes(model, sums), torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            model(tokens[start : start + batch_size])
    count = tokens.numel()
    return tuple(min(2.0, max(0.0, 1.0 - total / count)) for total in sums)


def proxy_order_of(scores: Sequence[float]) -> tuple[int, ...]:
    """Blocks by ascending score (least important first), ties by block index."""
    return tuple(sorted(range(len(scores)), key=lambda b: (scores[b], b)))


# -- Greedy Sequential Importance, resumable ----------------------------------


def checkpoint_path(out_path: str | Path) -> Path:
    """Where profile_model keeps its progress for `out_path`: next to it,
    'profile.json' -> 'profile.checkpoint.json'."""
    out = Path(out_path)
    return out.with_name(out.name.removesuffix(".json") + ".checkpoint.json")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename), so an interrupted
    write never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


@dataclass
class _Progress:
    """GSI state as stored in the checkpoint."""

    dense_perplexity: float
    proxy_scores: tuple[float, ...]
    order: list[int]
    perplexity: list[float]
    pending: dict[int, float]  # candidates of the next step measured so far
    evaluations: int = 0  # GSI evaluations over all runs
    gsi_seconds: float = 0.0
    proxy_seconds: float = 0.0

    def to_dict(self, key: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "key": key,
            "dense_perplexity": self.dense_perplexity,
            "proxy_scores": list(self.proxy_scores),
            "gsi_order": self.order,
            "gsi_perplexity": self.perplexity,
            "pending": [[block, value] for block, value in sorted(self.pending.items())],
            "evaluations": self.evaluations,
            "gsi_seconds": self.gsi_seconds,
            "proxy_seconds": self.proxy_seconds,
        }


def _read_checkpoint(
    path: Path, key: dict[str, Any], dense_perplexity: float, blocks: int
) -> _Progress | None:
    """The checkpoint's progress if it is for this model, config and tokens
    (and the dense perplexity re-measured now matches); otherwise None."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != CHECKPOINT_FORMAT or raw.get("version") != FORMAT_VERSION:
            raise ValueError("not a version-1 GSI checkpoint")
        if raw["key"] != key:
            log.warning("ignoring %s: it is for another model, config or token set", path)
            return None
        stored = float(raw["dense_perplexity"])
        if abs(stored - dense_perplexity) > _RESUME_TOLERANCE * dense_perplexity:
            log.warning(
                "ignoring %s: its dense perplexity %.6g differs from this model's %.6g "
                "(other weights?)",
                path,
                stored,
                dense_perplexity,
            )
            return None
        progress = _Progress(
            dense_perplexity=dense_perplexity,
            proxy_scores=tuple(float(s) for s in raw["proxy_scores"]),
            order=[int(b) for b in raw["gsi_order"]],
            perplexity=[float(p) for p in raw["gsi_perplexity"]],
            pending={int(b): float(p) for b, p in raw["pending"]},
            evaluations=int(raw["evaluations"]),
            gsi_seconds=float(raw["gsi_seconds"]),
            proxy_seconds=float(raw["proxy_seconds"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: unreadable GSI checkpoint ({error}); delete it to start over"
        ) from None
    order_ok = len(set(progress.order)) == len(progress.order) < blocks and all(
        0 <= b < blocks for b in progress.order
    )
    if not (
        order_ok
        and len(progress.perplexity) == len(progress.order)
        and len(progress.proxy_scores) == blocks
        and all(0 <= b < blocks and b not in progress.order for b in progress.pending)
    ):
        raise ValueError(f"{path}: inconsistent GSI checkpoint; delete it to start over")
    return progress


def _evaluations_left(blocks: int, done_steps: int, target_steps: int) -> int:
    """Evaluations for GSI steps done_steps..target_steps-1 (step k tries 2L - k blocks)."""
    return sum(blocks - step for step in range(done_steps, target_steps))


def profile_model(
    model: ElasticLlama,
    tokens: torch.Tensor,
    *,
    out_path: str | Path,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    proxy_tokens: torch.Tensor | None = None,
    batch_size: int = 8,
    model_name: str | None = None,
    command: str | None = None,
    seed: int | None = None,
    corpus_digest: str | None = None,
) -> ModelProfile:
    """Measure a model's profile on the windows `tokens` [N, T] and write it
    to `out_path`.

    GSI runs until one block is left, `max_steps` GSI steps exist in total
    (counting resumed ones), or `time_limit_s` seconds of this call have
    passed (checked before each evaluation, so it overruns by at most one);
    meta["complete"] says whether it finished. Progress is checkpointed
    after every evaluation to `checkpoint_path(out_path)`; a later call with
    the same model, config and tokens resumes there (one for anything else
    is replaced, with a warning). The checkpoint is removed once GSI is
    complete.

    `proxy_tokens` (default: `tokens`) are the windows of the one-pass proxy.
    `command`, `seed` and `corpus_digest` are recorded in meta to say how
    the tokens were made. The model must have been loaded from a weights
    file (GSI restores blocks); it is returned to its original plan."""
    started = _clock()
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0
    ):
        raise ValueError(f"max_steps must be a non-negative integer or None, got {max_steps!r}")
    if time_limit_s is not None and not time_limit_s >= 0:
        raise ValueError(f"time_limit_s must be non-negative or None, got {time_limit_s!r}")
    if model.weights_path is None:
        raise ValueError("profiling restores dropped blocks, so the model must be loaded from disk")
    config = model.config
    blocks = config.num_blocks
    evaluator = PerplexityEvaluator(model, tokens, batch_size)
    proxy_windows = (
        evaluator.tokens
        if proxy_tokens is None
        else check_tokens(proxy_tokens, config.vocab_size, config.max_position_embeddings)
    )
    out = Path(out_path)
    checkpoint = checkpoint_path(out)
    name = model_name or model.weights_path.parent.name
    dtype = str(model.dtype).removeprefix("torch.")
    key = {
        "model_name": name,
        "config": config.to_hf_dict(),
        "dtype": dtype,
        "tokens_digest": evaluator.digest,
        "proxy_tokens_digest": tokens_digest(proxy_windows),
    }
    target = blocks - 1 if max_steps is None else min(max_steps, blocks - 1)
    original_plan = model.plan
    timed_out = False
    try:
        clock = time.perf_counter()
        dense_perplexity = evaluator.evaluate(PruningPlan.dense(config.num_hidden_layers))
        dense_seconds = time.perf_counter() - clock
        state = _read_checkpoint(checkpoint, key, dense_perplexity, blocks)
        resumed_steps = 0 if state is None else len(state.order)
        if state is None:
            clock = time.perf_counter()
            scores = block_proxy_scores(model, proxy_windows, batch_size)
            state = _Progress(dense_perplexity, scores, [], [], {})
            state.proxy_seconds = time.perf_counter() - clock
            _write_json(checkpoint, state.to_dict(key))
        elif resumed_steps:
            log.info("resuming GSI from %s at step %d", checkpoint, resumed_steps)
        timed_out = _run_gsi(
            evaluator, state, target, key, checkpoint, started, time_limit_s, progress
        )
    finally:
        model.apply_plan(original_plan)

    complete = len(state.order) == blocks - 1
    weights, kv = block_bytes(config, dtype)
    gsi_seconds = state.gsi_seconds
    profile = ModelProfile(
        model_name=name,
        config=config,
        dtype=dtype,
        block_weight_bytes=weights,
        block_kv_bytes_per_token=kv,
        dense_perplexity=dense_perplexity,
        gsi_order=tuple(state.order),
        gsi_perplexity=tuple(state.perplexity),
        proxy_order=proxy_order_of(state.proxy_scores),
        proxy_scores=state.proxy_scores,
        eval_tokens=evaluator.num_tokens,
        meta={
            "complete": complete,
            "stopped_by": ("complete" if complete else "time_limit" if timed_out else "max_steps"),
            "command": command,
            "seed": seed,
            "corpus_digest": corpus_digest,
            "tokens_digest": key["tokens_digest"],
            "proxy_tokens_digest": key["proxy_tokens_digest"],
            "windows": evaluator.num_windows,
            "window_tokens": evaluator.window_length,
            "proxy_tokens": int(proxy_windows.numel()),
            "batch_size": batch_size,
            "packed": model.packed,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "resumed_from_step": resumed_steps,
            "gsi_evaluations": state.evaluations,
            "timings": {
                "dense_s": round(dense_seconds, 3),
                "proxy_s": round(state.proxy_seconds, 3),
                "gsi_s": round(gsi_seconds, 3),
                "seconds_per_evaluation": (
                    round(gsi_seconds / state.evaluations, 4) if state.evaluations else None
                ),
                "this_run_s": round(_clock() - started, 3),
            },
        },
    )
    profile.save(out)
    if complete:
        checkpoint.unlink(missing_ok=True)
    return profile


def _run_gsi(
    evaluator: PerplexityEvaluator,
    state: _Progress,
    target: int,
    key: dict[str, Any],
    checkpoint: Path,
    started: float,
    time_limit_s: float | None,
    progress: bool,
) -> bool:
    """Extend state's GSI order up to `target` steps, checkpointing after
    every evaluation. Returns True if it stopped for the time limit."""
    blocks = evaluator.model.config.num_blocks
    kept = set(range(blocks)) - set(state.order)
    total = _evaluations_left(blocks, len(state.order), target) - len(state.pending)
    bar = tqdm(total=max(total, 0), desc="GSI", unit="eval", disable=not progress)
    try:
        while len(state.order) < target:
            for block in sorted(kept - set(state.pending)):
                if time_limit_s is not None and _clock() - started >= time_limit_s:
                    return True
                clock = time.perf_counter()
                plan = PruningPlan.without_blocks(blocks // 2, [*state.order, block])
                state.pending[block] = evaluator.evaluate(plan)
                state.gsi_seconds += time.perf_counter() - clock
                state.evaluations += 1
                _write_json(checkpoint, state.to_dict(key))
                bar.update(1)
            # The least harmful removal; ties go to the lower block index so
            # that a resumed run picks exactly what an uninterrupted one would.
            best = min(kept, key=lambda b: (state.pending[b], b))
            state.order.append(best)
            state.perplexity.append(state.pending[best])
            state.pending.clear()
            kept.remove(best)
            _write_json(checkpoint, state.to_dict(key))
            bar.set_postfix_str(
                f"step {len(state.order)}: -{block_name(best)} ppl {state.perplexity[-1]:.4g}"
            )
        return False
    finally:
        bar.close()
