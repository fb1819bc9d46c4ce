"""Batched text generation on the elastic model: prefill all prompts at once
(different lengths, right-padded), then decode one token per row per step
with per-row sampling parameters, stopping rows on EOS, stop strings or
their token limit.

When a sequence finishes is decided by `FinishRules` alone, for this
module's `TextGenerator` and for the serving engine's continuous batching
alike, so that a request ends the same way whichever of them runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer

from elasticfleet.worker.model.llama import ElasticLlama

TOKENIZER_FILE = "tokenizer.json"

# SmolLM2-Instruct's chat format (ChatML with its default system prompt).
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(user: str, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Wrap a user message in the instruct model's chat template."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer written by `elasticfleet model prepare`."""
    return Tokenizer.from_file(str(Path(model_dir) / TOKENIZER_FILE))


# Below this a positive temperature is greedy in all but name, and it is where
# pathological values live: logits divided by 1e-45 overflow float32. A
# client that means greedy sends 0. (Sampling is also safe for any positive
# temperature, see sample_row; this keeps the meaning of the knob honest.)
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Keep going past EOS (benchmarks compare fixed token counts).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise ValueError(
                f"max_new_tokens must be between 1 and 1000000, got {self.max_new_tokens}"
            )
        if not (
            math.isfinite(self.temperature)
            and (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= 100.0)
        ):
            raise ValueError(
                f"temperature must be between 0 and 100 (0 is greedy; a positive one at least "
                f"{MIN_TEMPERATURE}), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One prompt's result. finish_reason is 'eos', 'stop' or 'length'."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits and outside the top_p nucleus. [V] -> [V]"""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        remove = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


class SamplingError(ArithmeticError):
    """A row's logits admit no distribution to sample from (not finite):
    the model's fault for that row, never another row's."""


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Sample one token from one row's logits [V] (temperature > 0).

    The logits are shifted so their maximum is 0 before scaling: scaled
    values then lie in [-inf, 0] whatever the temperature, so the softmax
    never sees an overflow (1e-45 would turn float32 logits into inf and the
    probabilities into NaN) and the most likely token always keeps mass. In
    float64, so that no positive temperature rounds to 0 and makes 0/0."""
    row = logits.double()
    if not bool(torch.isfinite(row).all()):
        raise SamplingError("the model produced non-finite logits for this sequence")
    scaled = filter_logits((row - row.max()) / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator)[0])


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int | SamplingError]:
    """Each row's next token from logits [B, V], or the SamplingError that
    row alone ran into: one row's failure never costs another row its token."""
    greedy: list[int] = logits.argmax(-1).tolist()
    tokens: list[int | SamplingError] = []
    for row, p in enumerate(params):
        try:
            tokens.append(greedy[row] if p.greedy else sample_row(logits[row], p, generators[row]))
        except SamplingError as error:
            tokens.append(error)
    return tokens


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick each row's next token from its logits [B, V] -> [B]; raises the
    first row's SamplingError (local generation has no rows to spare)."""
    chosen: list[int] = []
    for token in sample_rows(logits, params, generators):
        if isinstance(token, SamplingError):
            raise token
        chosen.append(token)
    return torch.tensor(chosen, dtype=torch.long)


@dataclass(frozen=True)
class FinishRules:
    """When a sequence stops growing, and why: 'eos', 'stop' or 'length'.

    In this order, for each sampled token: the model's EOS token finishes
    the sequence ('eos') and is not kept, unless the request ignores EOS;
    otherwise the token is appended, and a stop string anywhere in the
    decoded text finishes it ('stop'; the caller cuts the text there);
    else reaching max_new_tokens, or the model's context with the prompt,
    finishes it ('length')."""

    eos_token_id: int
    context: int  # the model's max_position_embeddings

    def add(
        self,
        token: int,
        tokens: list[int],
        prompt_tokens: int,
        params: SamplingParams,
        text: Callable[[], str],
    ) -> str:
        """Apply the rules to `token`, appending it to the sequence's
        generated `tokens` unless it is an EOS that ends it (so 'eos' is
        the one reason whose token is not appended). `text()` is the
        decoded text of `tokens`; it is asked for only when there are stop
        strings, so a caller that shows no text decodes nothing. Returns
        the finish reason, or '' while the sequence goes on."""
        if token == self.eos_token_id and not params.ignore_eos:
            return "eos"
        tokens.append(token)
        if params.stop and any(s in text() for s in params.stop):
            return "stop"
        if len(tokens) >= params.max_new_tokens or prompt_tokens + len(tokens) >= self.context:
            return "length"
        return ""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string in it (all of it when none occurs)."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


class TextStream:
    """Turns one row's tokens, as they arrive, into text safe to show.

    Holds back a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and
    any tail that could still grow into a stop string, so nothing at or
    after a stop string is ever shown."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        # The row's tokens: push appends to it, and so may whoever generates
        # (FinishRules.add), then calls pending().
        self.tokens: list[int] = []
        self.shown = 0
        self._text = ""
        self._decoded = 0  # how many of `tokens` _text decodes

    @property
    def text(self) -> str:
        """The whole decoded text so far (callers test stop strings on it),
        decoded at most once per token."""
        if self._decoded != len(self.tokens):
            self._text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
            self._decoded = len(self.tokens)
        return self._text

    def push(self, token: int) -> str:
        """Add a token; return the text that can now be shown."""
        self.tokens.append(token)
        return self.pending()

    def pending(self) -> str:
        """The text that can now be shown and was not yet."""
        text = self.text
        cut = len(text.rstrip("\ufffd"))
        for stop in self.stop:
            found = text.find(stop)
            if found >= 0:
                cut = min(cut, found)
            # Keep back the longest tail that is a proper prefix of the stop string.
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    cut = min(cut, len(text) - size)
                    break
        return self._show(text, cut)

    def finish(self, completion: Completion) -> str:
        """The rest of the completion's final text."""
        return self._show(completion.text, len(completion.text))

    def _show(self, text: str, cut: int) -> str:
        if cut <= self.shown:
            return ""
        fresh = text[self.shown : cut]
        self.shown = cut
        return fresh


class TextGenerator:
    """Generates text for a batch of prompts with an ElasticLlama and its tokenizer."""

    def __init__(self, model: ElasticLlama, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = model.config.eos_token_id

    def encode(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return ids

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Generate for text prompts; see generate_ids."""
        return self.generate_ids([self.encode(p) for p in prompts], params, on_token)

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Generate for token-id prompts in one batch. `on_token(row, token_id)`
        is called for every token as it is produced (for streaming)."""
        batch = len(prompts)
        if batch == 0:
            return []
        per_row = [params] * batch if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != batch:
            raise ValueError(f"{batch} prompts but {len(per_row)} sampling parameter sets")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("prompts must not be empty")
        context = self.model.config.max_position_embeddings
        longest = max(length + p.max_new_tokens for length, p in zip(lengths, per_row, strict=True))
        if max(lengths) >= context:
            raise ValueError(
                f"prompt of {max(lengths)} tokens does not fit the context of {context}"
            )
        capacity = min(longest, context)

        generators = [
            None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in per_row
        ]
        results = [Completion(prompt_tokens=length) for length in lengths]
        input_ids = torch.zeros(batch, max(lengths), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        input_lengths = torch.tensor(lengths)
        cache = self.model.new_cache(batch, capacity)
        rules = FinishRules(self.eos_token_id, context)
        active = list(range(batch))
        while active:
            logits = self.model(input_ids, cache, input_lengths=input_lengths, last_only=True)
            tokens = sample_next(logits[:, 0], per_row, generators)
            for row in list(active):
                token = int(tokens[row])
                result = results[row]
                result.finish_reason = rules.add(
                    token,
                    result.token_ids,
                    result.prompt_tokens,
                    per_row[row],
                    partial(self._decode, result.token_ids),
                )
                if result.finish_reason:
                    active.remove(row)
                if on_token is not None and result.finish_reason != "eos":
                    on_token(row, token)
            input_ids = tokens[:, None]
            input_lengths = torch.ones(batch, dtype=torch.long)
        for result, p in zip(results, per_row, strict=True):
            result.text = self._finish_text(result, p)
        return results

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text

    def _finish_text(self, result: Completion, params: SamplingParams) -> str:
        return cut_at_stop(self._decode(result.token_ids), params.stop)
