"""Fixtures shared by every component's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elasticfleet.worker.config import tiny_config
from elasticfleet.worker.model import ElasticLlama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny model saved as config.json + model.safetensors."""
    torch.manual_seed(1234)
    model = ElasticLlama(tiny_config())
    # Small weights keep the next-token distribution broad enough to sample
    # from; norms are perturbed away from 1 so a wrong norm is visible.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.uniform_(0.5, 1.5)
        else:
            param.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    return path


@pytest.fixture(params=[False, True], ids=["plain", "packed"])
def tiny_model(tiny_model_dir: Path, request: pytest.FixtureRequest) -> ElasticLlama:
    """A fresh dense tiny model loaded from disk (so blocks can be restored),
    once with plain weights and once with oneDNN-packed ones."""
    return ElasticLlama.from_pretrained(tiny_model_dir, packed=request.param)


@pytest.fixture
def plain_model(tiny_model_dir: Path) -> ElasticLlama:
    """A fresh dense tiny model in the plain layout, for tests that need not
    run for both layouts."""
    return ElasticLlama.from_pretrained(tiny_model_dir, packed=False)


@pytest.fixture(scope="module")
def tiny_windows() -> torch.Tensor:
    """Six fixed windows of 24 token ids from the tiny model's vocabulary."""
    generator = torch.Generator().manual_seed(99)
    return torch.randint(0, 256, (6, 24), generator=generator)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct cache (prepared if missing)."""
    from elasticfleet.worker.prepare import prepare_model

    return prepare_model(progress=False)
