"""Adapter training on the tiny model: each layout learns its tasks, the
base stays frozen, and runs are reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elasticfleet.worker.adapters.training import (
    AdapterTrainingConfig,
    TaskData,
    evaluate,
    shared_rank,
    train_adapters,
)
from elasticfleet.worker.model.llama import ElasticLlama


def pattern_task(name: str, step: int, seed: int) -> TaskData:
    """Windows that follow one deterministic rule (token t+1 = t + step mod
    256) from random starts: learnable, and different per task."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 256, (40, 1), generator=generator)
    windows = (starts + step * torch.arange(17)[None, :]) % 256
    return TaskData(name, windows[:32], windows[32:])


TASKS = [pattern_task("up", 1, 0), pattern_task("skip", 7, 1), pattern_task("down", 255, 2)]


def config(layout: str, **overrides: object) -> AdapterTrainingConfig:
    values: dict[str, object] = dict(
        layout=layout, rank=4, alpha=8.0, steps=40, windows_per_task=4, learning_rate=2e-2
    )
    values.update(overrides)
    return AdapterTrainingConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["asym", "shared", "separate", "router"])
def test_each_layout_learns_its_tasks_with_the_base_frozen(
    plain_model: ElasticLlama, layout: str
) -> None:
    before = {name: t.clone() for name, t in plain_model.state_dict().items()}
    base = evaluate(plain_model, TASKS, {}, dict.fromkeys(["up", "skip", "down"]))
    result = train_adapters(plain_model, TASKS, config(layout), progress=False)
    assert result.steps == 40
    assert sum(result.losses[-5:]) < 0.75 * sum(result.losses[:5])
    for task, ppl in result.eval_perplexity.items():
        assert ppl < 0.6 * base[task], (task, ppl, base[task])
    after = plain_model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not p.requires_grad for s in result.sets.values() for p in s.parameters())
    expected_sets = 3 if layout == "separate" else 1
    assert len(result.sets) == expected_sets


def test_shared_lora_has_about_the_parameters_of_asym(plain_model: ElasticLlama) -> None:
    asym = train_adapters(plain_model, TASKS, config("asym", steps=1), progress=False)
    shared = train_adapters(plain_model, TASKS, config("shared", steps=1), progress=False)
    separate = train_adapters(plain_model, TASKS, config("separate", steps=1), progress=False)
    ratio = shared.trainable_parameters / asym.trainable_parameters
    assert 0.85 < ratio < 1.15
    assert separate.trainable_parameters > asym.trainable_parameters
    assert shared_rank(8, 3, plain_model, ("q_proj",)) == 16  # square: 8 * 4 / 2


def test_runs_are_reproducible_and_bounded(plain_model: ElasticLlama, tmp_path: Path) -> None:
    first = train_adapters(plain_model, TASKS, config("asym", steps=3), progress=False)
    second = train_adapters(plain_model, TASKS, config("asym", steps=3), progress=False)
    assert first.losses == second.losses
    one = first.sets["tasks"].weights()
    two = second.sets["tasks"].weights()
    assert all(torch.equal(one.tensors[n], two.tensors[n]) for n in one.tensors)
    timed = train_adapters(
        plain_model, TASKS, config("asym", steps=1000, time_limit=0.5), progress=False
    )
    assert 1 <= timed.steps < 1000


def test_bad_training_input_is_refused(tiny_model_dir: Path) -> None:
    packed = ElasticLlama.from_pretrained(tiny_model_dir, packed=True)
    if packed.packed:
        with pytest.raises(ValueError, match="plain weight layout"):
            train_adapters(packed, TASKS, config("asym"), progress=False)
    with pytest.raises(ValueError, match="unknown layout 'moe'"):
        config("moe")
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        config("asym", learning_rate=0.0)
