"""Fixtures for the serving tests: a tiny model directory that also holds a
tokenizer (so an engine or a server can be started on it like on the real
model), engines on it, and the reference for plan-switch semantics.

Test modules load it with `pytest_plugins = ["serving_fixtures"]`. It is not
a tests/worker/conftest.py because mypy, checking `tests` as a whole, would
then find two modules named `conftest`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from serving_helpers import make_engine
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.engine import Engine


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (ids 3..97); ids 0..2 are
    <unk>, <s> and </s> (the tiny model's EOS); the rest decode to '#n'."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    vocab.update({f"#{i}": i for i in range(len(vocab), 256)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture(scope="session")
def served_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights and config plus a character tokenizer."""
    path = tmp_path_factory.mktemp("served-tiny-model")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, path / file.name)
    char_tokenizer().save(str(path / TOKENIZER_FILE))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the test. When other processes keep the
    cores busy, the intra-op thread pool's spin-waits make small products
    ~50x slower (the tiny model) and the real model's 5x slower; one thread
    never waits for another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engine(served_model_dir: Path, one_thread: None) -> Iterator[Engine]:
    """An engine on the plain-layout tiny model, not started: tests drive it
    with step() so every interleaving is deterministic. Newcomers join at
    the next step (prefill_group=1), so tests can place joins exactly."""
    engine = make_engine(served_model_dir, prefill_group=1)
    yield engine
    engine.close()


Reference = Callable[[Sequence[int], int, PruningPlan | None, dict[int, PruningPlan]], list[int]]


@pytest.fixture
def reference_tokens(served_model_dir: Path) -> Reference:
    """Greedy tokens of one sequence run alone, the documented plan-switch
    semantics written out with the model and cache directly:
    reference(prompt, count, start_plan, switches) applies switches[i] just
    before token i is computed (so the switch's restored attention blocks
    hold KV only from there on)."""
    # One model for every call: apply_plan restores blocks bit-identically.
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)

    def reference(
        prompt: Sequence[int],
        count: int,
        start: PruningPlan | None,
        switches: dict[int, PruningPlan],
    ) -> list[int]:
        model.apply_plan(start or PruningPlan.dense(model.config.num_hidden_layers))
        cache = model.new_cache(1, len(prompt) + count)
        tokens: list[int] = []
        inputs = torch.tensor([list(prompt)])
        with torch.inference_mode():
            while len(tokens) < count:
                if len(tokens) in switches:
                    plan = switches[len(tokens)]
                    model.apply_plan(plan)
                    cache.sync_layers(plan.keep_attention, plan.kv_levels())
                token = int(model(inputs, cache, last_only=True)[0, -1].argmax())
                tokens.append(token)
                inputs = torch.tensor([[token]])
        return tokens

    return reference
