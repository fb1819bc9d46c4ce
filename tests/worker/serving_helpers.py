"""Helpers for the serving tests that are not fixtures: an engine on a model
directory, slowed-down engine steps, and a fake adapter host. (A plain module: test modules
import it, which they cannot do with a pytest plugin module without pytest
warning that it could not rewrite the plugin's asserts.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from valkey_server import self_signed_certificate

from elasticfleet.worker.adapters.interface import AdapterInfo, AdapterListing, AdapterRequest
from elasticfleet.worker.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from elasticfleet.worker.model.generation import TOKENIZER_FILE, SamplingParams
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.engine import Engine, TokenEvent

# Room for the tiny model's weights (about 0.4 MB) and a few hundred
# thousand bytes of KV; tests that need a tight budget compute their own.
LARGE_BUDGET = 64 * 2**20


# Greedy, 12 tokens, whatever the model says: a request whose length is known.
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)

# The reference_tokens fixture (serving_fixtures.py): the documented plan-switch
# semantics written out, a sequence's greedy tokens.
Reference = Callable[[Sequence[int], int, PruningPlan | None, dict[int, PruningPlan]], list[int]]


class Collector:
    """A sink that keeps a request's events; `done` is set when it ends."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.errors: list[Exception] = []
        self.done = threading.Event()

    def __call__(self, event: TokenEvent | Exception) -> None:
        if isinstance(event, Exception):
            self.errors.append(event)
            self.done.set()
        else:
            self.events.append(event)
            if event.finish_reason:
                self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finished(self) -> str:
        return self.events[-1].finish_reason if self.events else ""


def run_until_idle(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("engine still busy")


def encode(engine: Engine, text: str) -> list[int]:
    ids: list[int] = engine.tokenizer.encode(text, add_special_tokens=False).ids
    return ids


def certificate_pairs(folder: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """Two self-signed (certificate, key) pairs under `folder`; the test is
    skipped where the openssl command is missing."""
    pairs = []
    for name in ("a", "b"):
        (folder / name).mkdir()
        pair = self_signed_certificate(folder / name)
        if pair is None:
            pytest.skip("needs the openssl command")
        pairs.append(pair)
    return pairs[0], pairs[1]


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


class FakeAdapters:
    """An adapter host that knows one set; loading 'corrupt' or 'remote' fails
    the way a real store does, to check the status codes end to end."""

    def __init__(self) -> None:
        self.info = AdapterInfo("code", "v1", "tiny", 4, ("qa", "py"), 1000, True)
        self.batches: list[Sequence[AdapterRequest | None]] = []

    def check(self, request: AdapterRequest) -> None:
        if request.name != "code":
            raise NotFound(f"adapter {request.name!r} is not loaded")
        if request.task not in (None, "qa", "py"):
            raise InvalidArgument(f"adapter 'code' has no task {request.task!r}")

    def batch(self, rows: Sequence[AdapterRequest | None]) -> object:
        self.batches.append(list(rows))
        return None  # model.forward(adapters=None) runs the base model

    def resident_bytes(self) -> int:
        return 1000

    def apply_plan(self, plan: PruningPlan) -> None:
        pass

    def load(
        self, name: str, version: str, tasks: Sequence[str], room_bytes: int
    ) -> tuple[AdapterInfo, bool]:
        if name == "corrupt":
            raise DataLoss("blob A/0 of 'corrupt' fails its sha256 check")
        if name == "remote":
            raise Unavailable("Redis is unreachable; retry when it is back")
        return self.info, True

    def unload(self, name: str) -> int:
        return 1000

    def listing(self) -> AdapterListing:
        return AdapterListing((self.info,), 1000, 10_000)
