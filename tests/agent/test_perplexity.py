"""The perplexity evaluator on the tiny model: the number itself, caching,
what it does to the model, and input validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from elasticfleet.agent.perplexity import PerplexityEvaluator, tokens_digest
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan

PRUNED = PruningPlan.from_dropped(4, attention=[1, 3], ffn=[2])


def manual_perplexity(model: ElasticLlama, tokens: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy, from one full forward pass."""
    with torch.inference_mode():
        logits = model(tokens)  # [N, T, V]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return math.exp(float(loss))


def count_forwards(model: ElasticLlama) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("plan", [PruningPlan.dense(4), PRUNED], ids=["dense", "pruned"])
def test_perplexity_is_exp_of_mean_cross_entropy(
    tiny_model: ElasticLlama, tiny_windows: torch.Tensor, plan: PruningPlan
) -> None:
    # Batch size 4 over 6 windows: the last batch is short, and must weigh
    # each position, not each batch, equally.
    evaluator = PerplexityEvaluator(tiny_model, tiny_windows, batch_size=4)
    perplexity = evaluator.evaluate(plan)
    tiny_model.apply_plan(plan)
    assert perplexity == pytest.approx(manual_perplexity(tiny_model, tiny_windows), rel=1e-5)
    assert 1.0 < perplexity < math.inf


def test_batch_size_does_not_change_the_result(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    results = [
        PerplexityEvaluator(plain_model, tiny_windows, batch_size=size).evaluate(PRUNED)
        for size in (1, 4, 8)
    ]
    assert results == pytest.approx([results[0]] * 3, rel=1e-5)


def test_dropping_blocks_changes_perplexity(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    evaluator = PerplexityEvaluator(plain_model, tiny_windows)
    assert evaluator.evaluate(PRUNED) != evaluator.evaluate(PruningPlan.dense(4))


def test_int8_kv_is_evaluated_through_the_int8_cache(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    """Every position attends to keys and values read back from int8: the
    same as the model's forward through a cache holding them, a little off
    the full-precision perplexity."""
    int8_kv = PruningPlan.from_levels(["full"] * 8, ["int8", "full", "int8", "full"])
    evaluator = PerplexityEvaluator(plain_model, tiny_windows, batch_size=8)
    dense = evaluator.evaluate(PruningPlan.dense(4))
    perplexity = evaluator.evaluate(int8_kv)
    with torch.inference_mode():
        inputs = tiny_windows[:, :-1]
        logits = plain_model(inputs, plain_model.new_cache(len(inputs), inputs.shape[1]))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tiny_windows[:, 1:].reshape(-1))
    assert perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert perplexity != dense and perplexity == pytest.approx(dense, rel=0.01)


def test_results_are_cached_by_plan(plain_model: ElasticLlama, tiny_windows: torch.Tensor) -> None:
    evaluator = PerplexityEvaluator(plain_model, tiny_windows, batch_size=4)
    calls = count_forwards(plain_model)
    first = evaluator.evaluate(PRUNED)
    assert calls[0] == 2  # two batches
    assert evaluator.cache_info() == (0, 1, 1)
    # An equal plan built separately is the same key.
    again = evaluator.evaluate(PruningPlan.from_mask(PRUNED.to_mask()))
    assert again == first
    assert calls[0] == 2
    assert (evaluator.hits, evaluator.misses) == (1, 1)
    assert evaluator.cached(PRUNED) == first
    assert evaluator.cached(PruningPlan.dense(4)) is None
    assert evaluator.evaluations == 1
    evaluator.cache_clear()
    assert evaluator.cache_info() == (0, 0, 0)
    assert evaluator.evaluate(PRUNED) == first
    assert calls[0] == 4


def test_model_is_left_in_the_last_evaluated_plan(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    evaluator = PerplexityEvaluator(plain_model, tiny_windows)
    evaluator.evaluate(PRUNED)
    assert plain_model.plan == PRUNED
    evaluator.evaluate(PruningPlan.dense(4))
    assert plain_model.plan == PruningPlan.dense(4)
    # A cache hit runs nothing and so changes nothing.
    evaluator.evaluate(PRUNED)
    assert plain_model.plan == PruningPlan.dense(4)


def test_progress_callback_reports_windows(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    seen: list[tuple[int, int]] = []
    evaluator = PerplexityEvaluator(
        plain_model,
        tiny_windows,
        batch_size=4,
        progress=lambda done, total: seen.append((done, total)),
    )
    evaluator.evaluate(PruningPlan.dense(4))
    assert seen == [(4, 6), (6, 6)]


def test_progress_bar_option_runs(plain_model: ElasticLlama, tiny_windows: torch.Tensor) -> None:
    quiet = PerplexityEvaluator(plain_model, tiny_windows).evaluate(PRUNED)
    shown = PerplexityEvaluator(plain_model, tiny_windows, progress=True).evaluate(PRUNED)
    assert shown == quiet


def test_counts_and_digest(plain_model: ElasticLlama, tiny_windows: torch.Tensor) -> None:
    evaluator = PerplexityEvaluator(plain_model, tiny_windows.to(torch.int32))
    assert evaluator.tokens.dtype == torch.long
    assert (evaluator.num_windows, evaluator.window_length) == (6, 24)
    assert evaluator.num_tokens == 144
    assert evaluator.predicted_positions == 138
    assert evaluator.digest == tokens_digest(tiny_windows)
    changed = tiny_windows.clone()
    changed[0, 0] += 1
    assert tokens_digest(changed) != evaluator.digest
    assert tokens_digest(tiny_windows[:, :12]) != tokens_digest(tiny_windows.reshape(12, 12))


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.zeros((0, 8), dtype=torch.long), "empty"),
        (torch.zeros((3, 0), dtype=torch.long), "empty"),
        (torch.zeros((3, 1), dtype=torch.long), "at least 2 tokens"),
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros((2, 8)), "integer token ids"),
        (torch.full((2, 8), 256), r"0\.\.255"),
        (torch.full((2, 8), -1), r"0\.\.255"),
        (torch.zeros((1, 257), dtype=torch.long), "context of 256"),
    ],
    ids=["no-windows", "zero-length", "one-token", "1d", "float", "too-high", "negative", "long"],
)
def test_invalid_tokens_are_rejected(
    plain_model: ElasticLlama, tokens: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PerplexityEvaluator(plain_model, tokens)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_invalid_batch_size_is_rejected(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, batch_size: int
) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        PerplexityEvaluator(plain_model, tiny_windows, batch_size=batch_size)


def test_plan_for_another_model_is_rejected(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    evaluator = PerplexityEvaluator(plain_model, tiny_windows)
    with pytest.raises(ValueError, match="plan is for 6 layers"):
        evaluator.evaluate(PruningPlan.dense(6))
    assert evaluator.cache_info() == (0, 0, 0)


def pydoc_windows(model_dir: Path, windows: int, length: int) -> torch.Tensor:
    """Fixed windows of English reference prose from Python's own docs."""
    from pydoc_data.topics import topics

    from elasticfleet.worker.model.generation import load_tokenizer

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = load_tokenizer(model_dir).encode(text).ids
    stride = len(ids) // windows
    return torch.tensor([ids[i * stride : i * stride + length] for i in range(windows)])


@pytest.mark.real_model
def test_real_perplexity_matches_transformers_loss(real_model_dir: Path) -> None:
    """The evaluator's definition of perplexity is transformers' causal-LM
    loss (mean over shifted positions), exponentiated."""
    from transformers import LlamaForCausalLM

    tokens = pydoc_windows(real_model_dir, 2, 64)
    plain = ElasticLlama.from_pretrained(real_model_dir, packed=False)
    perplexity = PerplexityEvaluator(plain, tokens).evaluate(PruningPlan.dense(30))
    del plain
    hf_model: torch.nn.Module = LlamaForCausalLM.from_pretrained(
        real_model_dir, torch_dtype=torch.float32
    )
    with torch.inference_mode():
        loss = hf_model(input_ids=tokens, labels=tokens).loss
    assert perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert 2.0 < perplexity < 100.0  # a trained model on English prose
    packed = ElasticLlama.from_pretrained(real_model_dir)
    assert PerplexityEvaluator(packed, tokens).evaluate(PruningPlan.dense(30)) == pytest.approx(
        perplexity, rel=1e-4
    )
