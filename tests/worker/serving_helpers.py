"""Helpers for the serving tests that are not fixtures: an engine on a model
directory, and slowed-down engine steps. (A plain module: test modules
import it, which they cannot do with a pytest plugin module without pytest
warning that it could not rewrite the plugin's asserts.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving.engine import Engine

# Room for the tiny model's weights (about 0.4 MB) and a few hundred
# thousand bytes of KV; tests that need a tight budget compute their own.
LARGE_BUDGET = 64 * 2**20


def make_engine(model_dir: Path, budget: int = LARGE_BUDGET, **kwargs: Any) -> Engine:
    """An engine on the plain-layout model in `model_dir`, not started."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    return Engine(model, tokenizer, budget_bytes=budget, **kwargs)


class SlowSteps:
    """Make each engine iteration take at least `seconds` (so a test can
    act while a request is still running)."""

    def __init__(self, engine: Engine, seconds: float) -> None:
        self.engine = engine
        self.step = engine.step

        def slow_step() -> bool:
            time.sleep(seconds)
            return self.step()

        engine.step = slow_step  # type: ignore[method-assign]

    def undo(self) -> None:
        self.engine.step = self.step  # type: ignore[method-assign]
