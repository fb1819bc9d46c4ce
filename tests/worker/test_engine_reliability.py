"""The engine under bad luck and hostile input: callers that give up on a
plan, an engine thread that dies, one row that fails, identifiers
and prompts past their limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from serving_helpers import GREEDY, Collector, Reference, encode, run_until_idle
from tokenizers import Tokenizer

from elasticfleet.worker.adapters.interface import AdapterRequest
from elasticfleet.worker.errors import InvalidArgument, Unavailable
from elasticfleet.worker.model.generation import (
    TOKENIZER_FILE,
    SamplingError,
    SamplingParams,
    sample_rows,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import BLOCK_TOKENS, predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.engine import (
    MAX_PLAN_ID,
    MAX_PROMPT_BYTES,
    Engine,
    PlanSwitch,
    TokenEvent,
)

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]


def busy_engine(model_dir: Path) -> tuple[Engine, list[Collector], PruningPlan]:
    """An engine whose budget fits 2 sequences of 16 positions densely (a
    block each, and scratch); under a smaller plan it runs 4, so the dense
    plan must preempt two of them. Returns it (running the 4) and the dense plan."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    budget = predict_memory(model.config, model.plan, 3, BLOCK_TOKENS).total_bytes
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    engine = Engine(model, tokenizer, budget_bytes=budget, max_queue=8)
    layers = model.config.num_hidden_layers
    engine.submit_plan(PruningPlan.from_dropped(layers, attention=[0, 1, 2]), "small")
    sinks = [Collector() for _ in range(4)]
    for sink in sinks:
        engine.submit("abcd", GREEDY, sink)
    engine.step()
    assert engine.stats().picture.active_sequences == 4
    return engine, sinks, PruningPlan.dense(layers)


@pytest.mark.usefixtures("one_thread")
def test_a_plan_whose_caller_left_before_its_step_is_dropped(served_model_dir: Path) -> None:
    engine, sinks, dense = busy_engine(served_model_dir)
    left = engine.submit_plan(dense, "dense")
    assert left.cancel()  # the caller gives up (a cancelled RPC, a passed deadline)
    late = Collector()
    engine.submit("late", GREEDY, late)
    run_until_idle(engine)
    assert all(s.finished == "length" for s in [*sinks, late])
    assert engine.plan_id == "small" and engine.counters.preemptions == 0
    newer = engine.submit_plan(dense, "newer")
    engine.step()
    assert newer.result(timeout=1).plan_id == "newer"
    engine.close()


@pytest.mark.usefixtures("one_thread")
def test_a_background_engine_survives_callers_that_give_up_on_plans(
    served_model_dir: Path,
) -> None:
    engine, sinks, dense = busy_engine(served_model_dir)
    engine.start()
    for attempt in range(3):
        engine.submit_plan(dense, f"gave-up-{attempt}").cancel()
    assert all(s.done.wait(30) for s in sinks)
    assert all(s.finished == "length" for s in sinks)
    after = Collector()
    engine.submit("after", GREEDY, after)
    assert after.done.wait(30) and after.finished == "length"
    switch: PlanSwitch = engine.submit_plan(dense, "kept").result(timeout=30)
    assert switch.plan_id == "kept"
    assert engine.failure is None
    engine.close()


def test_an_engine_thread_that_dies_fails_everything_fast(engine: Engine) -> None:
    def broken() -> int:
        raise RuntimeError("admission bug")

    engine._admit = broken  # type: ignore[method-assign]
    heard: list[BaseException] = []
    engine.on_failure(heard.append)
    queued = Collector()
    engine.submit("never runs", GREEDY, queued)
    engine.start()
    assert queued.done.wait(10)
    assert len(queued.errors) == 1 and isinstance(queued.errors[0], Unavailable)
    assert "RuntimeError" in str(queued.errors[0]) and "admission bug" not in str(queued.errors[0])
    assert len(heard) == 1 and isinstance(engine.failure, RuntimeError)
    with pytest.raises(Unavailable, match="engine has stopped"):
        engine.submit("more", GREEDY, Collector())
    with pytest.raises(Unavailable, match="engine has stopped"):
        engine.submit_plan(engine.model.plan, "p")
    with pytest.raises(Unavailable):
        engine.check_running()
    late: list[BaseException] = []
    engine.on_failure(late.append)  # a listener that comes late hears at once
    assert late == heard


def test_a_row_whose_sampling_fails_fails_alone(engine: Engine) -> None:
    forward = engine._forward
    poisoned = Collector()
    others = [Collector(), Collector()]

    def nan_for_the_poisoned(input_ids: Any, lengths: Any, requests: Any) -> torch.Tensor:
        logits = forward(input_ids, lengths, requests).clone()
        for index, request in enumerate(requests):
            if request.sink is poisoned:
                logits[index] = float("nan")
        return logits

    engine._forward = nan_for_the_poisoned  # type: ignore[method-assign]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
    engine.submit("aa", GREEDY, others[0])
    engine.step()
    engine.submit("bb", sampled, poisoned)
    engine.submit("cc", sampled, others[1])
    run_until_idle(engine)
    assert len(poisoned.errors) == 1 and isinstance(poisoned.errors[0], SamplingError)
    assert all(s.finished == "length" and not s.errors for s in others)
    assert engine.counters.requests_failed == 1 and engine.counters.requests_finished == 2
    assert engine.stats().picture.kv_reserved_bytes == 0


def test_a_row_that_fails_after_sampling_fails_alone(engine: Engine) -> None:
    advance = engine._advance
    victim, bystander = Collector(), Collector()

    def fail_the_victim(request: Any, token: int, rules: Any) -> TokenEvent:
        if request.sink is victim and request.tokens:
            raise ValueError("this row's bookkeeping broke")
        return advance(request, token, rules)

    engine._advance = fail_the_victim  # type: ignore[method-assign]
    engine.submit("aa", GREEDY, victim)
    engine.submit("bb", GREEDY, bystander)
    run_until_idle(engine)  # it used to end both with the one error
    assert len(victim.errors) == 1 and not bystander.errors
    assert bystander.finished == "length" and len(bystander.events) == 12


def test_a_newcomer_whose_prefill_fails_fails_alone(
    engine: Engine, reference_tokens: Reference
) -> None:
    forward = engine._forward
    running, broken = Collector(), Collector()
    group = [Collector(), Collector()]

    def fail_the_broken(input_ids: Any, lengths: Any, requests: Any) -> torch.Tensor:
        if any(r.sink is broken for r in requests):
            raise RuntimeError("prefill broke")
        return forward(input_ids, lengths, requests)

    engine._forward = fail_the_broken  # type: ignore[method-assign]
    engine.submit("aa", GREEDY, running)
    engine.step()
    engine.submit("bb", GREEDY, group[0])
    engine.submit("cc", GREEDY, broken)  # shares a prefill with bb and dd
    engine.submit("dd", GREEDY, group[1])
    engine.step()
    assert engine.iterations[-1].newcomers == 3
    run_until_idle(engine)
    assert len(broken.errors) == 1
    for sink in (running, *group):
        assert not sink.errors and sink.finished == "length" and len(sink.events) == 12
    assert engine.counters.requests_failed == 1 and engine.counters.requests_finished == 3
    for prompt, sink in zip(("aa", "bb", "dd"), (running, *group), strict=True):
        assert sink.tokens == reference_tokens(encode(engine, prompt), 12, None, {})


def unchecked(**values: Any) -> SamplingParams:
    """Sampling parameters past the door's checks."""
    params = SamplingParams(temperature=1.0)
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


def test_sampling_is_finite_for_any_positive_temperature_and_edge_filters() -> None:
    """Values the door refuses, or lets through at its edges, still sample a
    token per row and never a NaN: shifting by the maximum keeps the scaled
    logits in [-inf, 0]."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 30
    params = [
        unchecked(temperature=1e-45),
        unchecked(temperature=5e-324),  # 0 in float32: would divide 0 by 0
        unchecked(temperature=100.0, top_k=1, top_p=1e-30),
        unchecked(temperature=1e-3, top_k=2**32 - 1),
        SamplingParams(),  # greedy
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    tokens = sample_rows(logits, params, generators)
    for row in (0, 1, 2, 4):  # ~0 temperature, top-k 1, greedy: the top token
        assert tokens[row] == int(logits[row].argmax())
    assert isinstance(tokens[3], int) and 0 <= tokens[3] < 50
    broken = logits.clone()
    broken[3, 7] = float("inf")
    out = sample_rows(broken, params, generators)
    assert isinstance(out[3], SamplingError)
    assert [out[i] for i in (0, 1, 2, 4)] == [tokens[i] for i in (0, 1, 2, 4)]


def test_sampling_values_that_overflow_are_refused_at_the_door() -> None:
    for temperature in (1e-45, 1e-10, 0.0009, float("nan"), float("inf"), -1.0, 100.5):
        with pytest.raises(ValueError, match="temperature must be between 0 and 100"):
            SamplingParams(temperature=temperature)
    assert SamplingParams(temperature=1e-3).temperature == 1e-3
    assert SamplingParams(temperature=0.0).greedy


def test_identifiers_are_bounded_and_never_echoed(engine: Engine) -> None:
    huge = "p" * 10_000
    layers = engine.model.config.num_hidden_layers
    with pytest.raises(
        InvalidArgument, match=f"plan_id has 10000 characters; at most {MAX_PLAN_ID}"
    ):
        engine.submit_plan(PruningPlan.dense(layers), huge)
    engine.submit_plan(PruningPlan.dense(layers), "p" * MAX_PLAN_ID)
    cases: list[tuple[str, Any]] = [
        ("request_id", lambda: engine.submit("hi", GREEDY, Collector(), request_id=huge)),
        (
            "adapter.name",
            lambda: engine.submit("hi", GREEDY, Collector(), adapter=AdapterRequest(huge)),
        ),
        (
            "adapter.task",
            lambda: engine.submit("hi", GREEDY, Collector(), adapter=AdapterRequest("a", huge)),
        ),
        ("name", lambda: engine.load_adapter(huge, "", [])),
        ("version", lambda: engine.load_adapter("a", huge, [])),
        ("task", lambda: engine.load_adapter("a", "", [huge])),
        ("tasks named", lambda: engine.load_adapter("a", "", ["t"] * 65)),
        ("name", lambda: engine.unload_adapter(huge)),
        ("name is empty", lambda: engine.unload_adapter("")),
    ]
    for field, call in cases:
        with pytest.raises(InvalidArgument, match=field) as raised:
            call()
        assert huge not in str(raised.value) and len(str(raised.value)) < 200


def test_prompts_are_bounded_by_bytes_before_tokenizing(engine: Engine) -> None:
    calls: list[int] = []
    tokenizer = engine.tokenizer

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(1)
            return getattr(tokenizer, name)

    engine.tokenizer = Counting()  # type: ignore[assignment]
    for prompt in ("x" * (MAX_PROMPT_BYTES + 1), "é" * (MAX_PROMPT_BYTES // 2 + 1)):
        with pytest.raises(InvalidArgument, match=f"longer than {MAX_PROMPT_BYTES} bytes"):
            engine.prepare(prompt, GREEDY)
    assert calls == []  # refused without tokenizing
