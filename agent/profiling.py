"""Profiling: measuring how much each block of a model matters.

The result is a `ModelProfile` (profile.py), the small record the policies
and the operator read. Two rankings:

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
  not reached yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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
from elasticfleet.agent.profile import (
    FORMAT_VERSION,
    ModelProfile,
    block_bytes,
    block_name,
    write_json,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import FULL, INT4, INT8, PruningPlan

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "elasticfleet-gsi-checkpoint"


# A resumed run re-measures the dense perplexity; if it differs from the
# checkpoint's by more than this (relative), the checkpoint is for other
# weights and is not continued. Packed and plain layouts agree far closer.
_RESUME_TOLERANCE = 1e-4

# The clock of time limits (a module attribute so tests can drive it).
_clock = time.monotonic


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
            write_json(checkpoint, state.to_dict(key))
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
                write_json(checkpoint, state.to_dict(key))
                bar.update(1)
            # The least harmful removal; ties go to the lower block index so
            # that a resumed run picks exactly what an uninterrupted one would.
            best = min(kept, key=lambda b: (state.pending[b], b))
            state.order.append(best)
            state.perplexity.append(state.pending[best])
            state.pending.clear()
            kept.remove(best)
            write_json(checkpoint, state.to_dict(key))
            bar.set_postfix_str(
                f"step {len(state.order)}: -{block_name(best)} ppl {state.perplexity[-1]:.4g}"
            )
        return False
    finally:
        bar.close()


def measure_level_costs(
    model: ElasticLlama,
    tokens: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, tuple[float, ...]]:
    """Each block's cost at int8 and at int4, and each layer's KV cache at
    int8 (`kv_int8`): the log-perplexity that quantizing that block or
    cache alone adds to the dense model's on `tokens` (calibration text).
    2 x 2L + L evaluations. Quantization errors are small
    and nearly independent across blocks, so the ladder's quality estimate
    adds them up (agent/quality.py); a block whose rounding happened to help
    records a negative cost, which the estimate counts as zero."""
    evaluator = PerplexityEvaluator(model, tokens, batch_size)
    blocks = model.config.num_blocks
    dense = math.log(evaluator.evaluate(PruningPlan.dense(model.config.num_hidden_layers)))
    costs: dict[str, tuple[float, ...]] = {}
    layers = model.config.num_hidden_layers
    bar = tqdm(total=2 * blocks + layers, desc="level costs", unit="eval", disable=not progress)

    def cost(plan: PruningPlan) -> float:
        bar.update()
        return math.log(evaluator.evaluate(plan)) - dense

    for level in (INT8, INT4):
        costs[level] = tuple(
            cost(PruningPlan.from_levels([level if b == block else FULL for b in range(blocks)]))
            for block in range(blocks)
        )
    costs["kv_int8"] = tuple(
        cost(
            PruningPlan.from_levels(
                [FULL] * blocks, [INT8 if i == layer else FULL for i in range(layers)]
            )
        )
        for layer in range(layers)
    )
    bar.close()
    model.apply_plan(PruningPlan.dense(model.config.num_hidden_layers))
    return costs
