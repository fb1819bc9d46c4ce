"""The elastic model on the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from elasticfleet.worker.accounting import account
from elasticfleet.worker.generate import SamplingParams, TextGenerator, chat_prompt, load_tokenizer
from elasticfleet.worker.memory import predict_memory
from elasticfleet.worker.model import ElasticLlama
from elasticfleet.worker.plan import PruningPlan

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


def test_dense_logits_match_transformers(
    generator: TextGenerator, hf_model: torch.nn.Module
) -> None:
    for prompt in PROMPTS:
        ids = torch.tensor([generator.encode(prompt)])
        with torch.inference_mode():
            ours = generator.model(ids)
            theirs = hf_model(input_ids=ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4


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


MEASURE = textwrap.dedent(
    """
    import gc, json, os, sys
    import torch
    from elasticfleet.worker.model import ElasticLlama
    from elasticfleet.worker.plan import PruningPlan

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    path, drop_attention, drop_ffn, batch, seq = json.loads(sys.argv[1])
    torch.zeros(1)
    gc.collect()
    base = rss()
    plan = PruningPlan.from_dropped(30, drop_attention, drop_ffn)
    model = ElasticLlama.from_pretrained(path, plan=plan)
    cache = model.new_cache(batch, seq)
    gc.collect()
    print(rss() - base)
    """
)


@pytest.mark.parametrize(
    ("drop_attention", "drop_ffn", "batch", "seq"),
    [([], [], 1, 512), ([20, 22, 24, 26, 28], [], 8, 1024), ([3, 9], list(range(10, 25)), 4, 2048)],
)
def test_prediction_matches_measured_allocation(
    real_model_dir: Path, drop_attention: list[int], drop_ffn: list[int], batch: int, seq: int
) -> None:
    """Resident memory the process gains by loading the model with a plan and
    allocating its KV cache, against the memory model's prediction."""
    config = ElasticLlama.from_pretrained(real_model_dir).config
    plan = PruningPlan.from_dropped(30, drop_attention, drop_ffn)
    predicted = predict_memory(config, plan, batch, seq).total_bytes
    arg = json.dumps([str(real_model_dir), drop_attention, drop_ffn, batch, seq])
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, arg], capture_output=True, text=True, check=True, cwd="/"
    )
    measured = int(out.stdout)
    assert abs(measured - predicted) / predicted <= 0.01, (measured, predicted)
