"""Perplexity of the elastic model under a pruning plan, on fixed token windows.

Every importance measure the agent uses comes down to "how much worse does
the model predict text with these blocks gone": RAP's Greedy Sequential
Importance evaluates thousands of plans that way, and the policies' reward
needs the same number. So one evaluator owns that measurement, with the
choices that make the numbers comparable pinned in one place: the same
windows in the same batches, every next-token position counted equally,
the loss summed in float64, and no sampling anywhere.

Evaluations are expensive (a forward pass over every window) and GSI asks
for the same plan more than once across steps and resumptions, so results
are cached by the plan's keep-mask.

A plan with int8 KV caches is evaluated through a KV cache
(worker/model/kvcache.py) sized for the windows: every position then
attends to keys and values read back from that layer's int8 storage, as a
decode step would. Without int8 KV no cache is used (the same numbers,
cheaper).

The evaluator changes the model it is given: `evaluate` applies each plan
it has to measure (`ElasticLlama.apply_plan`) and restores nothing, so after
a call the model is in the plan of the last evaluation that ran a forward
pass (a cache hit touches nothing). Callers that care re-apply their own
plan afterwards.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import INT8, PruningPlan

# Called after each batch with (windows done, windows in total).
ProgressCallback = Callable[[int, int], None]


class CacheInfo(NamedTuple):
    """Cache statistics, in the spirit of functools.lru_cache's."""

    hits: int
    misses: int
    currsize: int


def check_tokens(tokens: torch.Tensor, vocab_size: int, max_positions: int) -> torch.Tensor:
    """Validate evaluation windows and return them as a contiguous int64 [N, T]
    tensor on the CPU. Raises ValueError with the reason otherwise."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(
            f"tokens must be a 2-D [windows, window_length] tensor, got shape {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    windows, length = tokens.shape
    if windows == 0 or length == 0:
        raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}); give at least one window")
    if length < 2:
        raise ValueError(
            f"windows must be at least 2 tokens long to predict a next token, got {length}"
        )
    if length > max_positions:
        raise ValueError(
            f"windows are {length} tokens long, beyond the model's context of {max_positions}"
        )
    tokens = tokens.detach().to("cpu", torch.long).contiguous()
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids must lie in 0..{vocab_size - 1} (the model's vocabulary), "
            f"got ids from {low} to {high}"
        )
    return tokens


def tokens_digest(tokens: torch.Tensor) -> str:
    """A sha256 of the windows' shape and ids, so a saved result can name the
    exact text it was measured on."""
    data = tokens.detach().to("cpu", torch.long).contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}".encode())
    digest.update(data.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


class PerplexityEvaluator:
    """Perplexity of `model` under a plan over the windows `tokens` [N, T].

    Perplexity is exp of the mean next-token negative log-likelihood over all
    N x (T - 1) predicted positions (every window starts fresh, so its first
    token is context only). Windows run `batch_size` at a time.

    `progress` is False (silent), True (a tqdm bar per evaluation, for long
    ones) or a callback called after each batch with (windows done, total).

    The model is left in the plan of the last evaluation that missed the
    cache; see the module docstring.
    """

    def __init__(
        self,
        model: ElasticLlama,
        tokens: torch.Tensor,
        batch_size: int = 8,
        *,
        progress: bool | ProgressCallback = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        config = model.config
        self.model = model
        self.tokens = check_tokens(tokens, config.vocab_size, config.max_position_embeddings)
        self.batch_size = batch_size
        self.progress = progress
        self.digest = tokens_digest(self.tokens)
        self._cache: dict[PruningPlan, float] = {}
        self._hits = 0
        self._misses = 0
        # Forward-pass evaluations and the seconds they took, for timing reports.
        self.evaluations = 0
        self.eval_seconds = 0.0

    @property
    def num_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def window_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_tokens(self) -> int:
        """Tokens the perplexities are measured on (N x T)."""
        return self.num_windows * self.window_length

    @property
    def predicted_positions(self) -> int:
        """Positions whose next token is scored (N x (T - 1))."""
        return self.num_windows * (self.window_length - 1)

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def cache_clear(self) -> None:
        """Forget cached results (for example after changing the model's weights)."""
        self._cache.clear()
        self._hits = 0
        self._misses = 0

    def cached(self, plan: PruningPlan) -> float | None:
        """The cached perplexity of `plan`, or None; counts as neither hit nor miss."""
        return self._cache.get(plan)

    def evaluate(self, plan: PruningPlan) -> float:
        """Perplexity of the model under `plan` (applied to the model first)."""
        key = plan
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            return cached
        started = time.perf_counter()
        self.model.apply_plan(plan)  # validates the plan before anything counts
        self._misses += 1
        perplexity = self._measure()
        self.eval_seconds += time.perf_counter() - started
        self.evaluations += 1
        self._cache[key] = perplexity
        return perplexity

    def _measure(self) -> float:
        windows = self.num_windows
        bar = None
        callback: ProgressCallback | None = None
        if callable(self.progress):
            callback = self.progress
        elif self.progress:
            bar = tqdm(total=windows, desc="perplexity", unit="window", leave=False)
        total_nll = 0.0  # a Python float is float64: no drift over many batches
        try:
            with torch.inference_mode():
                for start in range(0, windows, self.batch_size):
                    batch = self.tokens[start : start + self.batch_size]  # [b, T]
                    inputs = batch[:, :-1]
                    cache = None
                    if INT8 in self.model.plan.kv_levels():
                        cache = self.model.new_cache(len(inputs), inputs.shape[1])
                    logits = self.model(inputs, cache)  # [b, T-1, V]
                    nll = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(),
                        batch[:, 1:].reshape(-1),
                        reduction="sum",
                    )
                    total_nll += float(nll.double())
                    del logits
                    done = min(start + self.batch_size, windows)
                    if bar is not None:
                        bar.update(done - bar.n)
                    if callback is not None:
                        callback(done, windows)
        finally:
            if bar is not None:
                bar.close()
        mean = total_nll / self.predicted_positions
        # exp overflows to inf above ~709 nats: a plan that broken ranks last.
        return math.exp(mean) if mean < 709.0 else math.inf
