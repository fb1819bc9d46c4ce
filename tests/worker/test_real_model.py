"""The elastic model on the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.generation import (
    SamplingParams,
    TextGenerator,
    chat_prompt,
    load_tokenizer,
)
from elasticfleet.worker.model.kernels import PACKED
from elasticfleet.worker.model.llama import ElasticLlama, Linear
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import FULL, PruningPlan

pytestmark = pytest.mark.real_model

PROMPTS = [
    chat_prompt("What is the capital of France?"),
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published",
]


@pytest.fixture(scope="module")
def real_model(real_model_dir: Path) -> ElasticLlama:
    return ElasticLlama.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def generator(real_model: ElasticLlama, real_model_dir: Path) -> TextGenerator:
    return TextGenerator(real_model, load_tokenizer(real_model_dir))


@pytest.fixture(scope="module")
def hf_model(real_model_dir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    model: torch.nn.Module = LlamaForCausalLM.from_pretrained(
        real_model_dir, torch_dtype=torch.float32
    )
    return model.eval()


@pytest.mark.parametrize(("packed", "tolerance"), [(False, 1e-4), (True, 3e-4)])
def test_dense_logits_match_transformers(
    real_model_dir: Path,
    generator: TextGenerator,
    hf_model: torch.nn.Module,
    packed: bool,
    tolerance: float,
) -> None:
    """The plain layout computes what transformers computes; the packed one
    only reorders each dot product's sums."""
    model = ElasticLlama.from_pretrained(real_model_dir, packed=packed)
    for prompt in PROMPTS:
        ids = torch.tensor([generator.encode(prompt)])
        with torch.inference_mode():
            ours = model(ids)
            theirs = hf_model(input_ids=ids).logits
        assert (ours - theirs).abs().max().item() <= tolerance


def test_greedy_generation_matches_transformers(
    generator: TextGenerator, hf_model: torch.nn.Module
) -> None:
    ids = generator.encode(PROMPTS[2])
    (ours,) = generator.generate_ids([ids], SamplingParams(max_new_tokens=24, ignore_eos=True))
    with torch.inference_mode():
        out = hf_model.generate(  # type: ignore[operator]
            torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24
        )
    assert ours.token_ids == out[0, len(ids) :].tolist()


def test_instruct_model_answers(generator: TextGenerator) -> None:
    (result,) = generator.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20))
    assert "Paris" in result.text
    assert result.finish_reason == "eos"


def test_batched_generation_matches_single(generator: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = generator.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        assert generator.generate([prompt], params)[0].token_ids == result.token_ids


def test_default_layout_is_measured_per_projection_shape(real_model: ElasticLlama) -> None:
    """Each full projection is packed exactly where the load-time
    measurement found the packed layout faster on this machine."""
    kernels = real_model.kernels
    assert kernels.measured, "the default load measures"
    for layer in range(real_model.config.num_hidden_layers):
        for module in (real_model.layer(layer).self_attn, real_model.layer(layer).mlp):
            assert module is not None
            for linear in module.children():
                assert isinstance(linear, Linear)
                chosen = kernels.kernel(FULL, linear.out_features, linear.in_features)
                assert linear.weight.is_mkldnn == (chosen == PACKED)


def test_drop_and_restore_real_blocks(real_model: ElasticLlama) -> None:
    ids = torch.tensor([[1, 504, 3458, 5483, 314, 4172]])
    with torch.inference_mode():
        dense = real_model(ids)
    before = account(real_model).weight_bytes
    plan = PruningPlan.from_dropped(30, attention=[18, 19, 21], ffn=[13, 22])
    real_model.apply_plan(plan)
    gc.collect()
    after = account(real_model).weight_bytes
    config = real_model.config
    assert before - after == (
        predict_memory(config, None, 0, 0).weight_bytes
        - predict_memory(config, plan, 0, 0).weight_bytes
    )
    with torch.inference_mode():
        assert not torch.equal(real_model(ids), dense)
    real_model.apply_plan(PruningPlan.dense(30))
    with torch.inference_mode():
        assert torch.equal(real_model(ids), dense)


# Runs in a fresh process with glibc's mmap threshold pinned, so every large
# buffer is its own mapping and freeing it returns it to the OS; a first load
# pages in the code paths, so the baseline holds everything but the tensors.
MEASURE = textwrap.dedent(
    """
    import gc, json, os, sys
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.plan import PruningPlan

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    path, first, second, batch, seq = json.loads(sys.argv[1])
    first = PruningPlan.from_mask(first)
    second = PruningPlan.from_mask(second)
    warm = ElasticLlama.from_pretrained(path, plan=first)
    warm.new_cache(batch, seq)
    del warm
    gc.collect()
    base = rss()
    model = ElasticLlama.from_pretrained(path, plan=first)
    cache = model.new_cache(batch, seq)
    gc.collect()
    loaded = rss() - base
    model.apply_plan(second)
    cache.sync_layers(second.keep_attention)
    gc.collect()
    print(json.dumps([loaded, rss() - base]))
    """
)


@pytest.mark.parametrize(
    ("first", "second", "batch", "seq"),
    [
        (PruningPlan.dense(30), PruningPlan.from_dropped(30, [28], [29]), 1, 512),
        (
            PruningPlan.from_dropped(30, [20, 22, 24, 26, 28]),
            PruningPlan.from_dropped(30, list(range(12, 30)), [5, 6]),
            8,
            1024,
        ),
        (
            PruningPlan.from_dropped(30, [3, 9], list(range(10, 25))),
            PruningPlan.from_dropped(30, [3], list(range(10, 20))),
            4,
            2048,
        ),
    ],
)
def test_prediction_matches_measured_allocation(
    real_model_dir: Path, first: PruningPlan, second: PruningPlan, batch: int, seq: int
) -> None:
    """Resident memory the process gains by loading the model under a plan
    with its KV cache, then after switching plans (dropping frees memory,
    restoring allocates it), against the memory model's prediction."""
    config = ElasticLlama.from_pretrained(real_model_dir).config
    arg = json.dumps([str(real_model_dir), first.to_mask(), second.to_mask(), batch, seq])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, arg],
        capture_output=True,
        text=True,
        check=True,
        cwd=real_model_dir,
        env=env,
    )
    measured = json.loads(out.stdout)
    for plan, got in zip((first, second), measured, strict=True):
        predicted = predict_memory(config, plan, batch, seq).total_bytes
        assert abs(got - predicted) / predicted <= 0.01, (plan.describe(), got, predicted)
