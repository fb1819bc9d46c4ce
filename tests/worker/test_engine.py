"""The serving engine on the tiny model, driven step by step: continuous
batching, admission against the budget, plan switches with the documented
semantics, cancellation and statistics."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from serving_helpers import GREEDY, Collector, Reference, encode, make_engine, run_until_idle
from tokenizers import Tokenizer

from elasticfleet.worker.adapters.interface import AdapterRequest
from elasticfleet.worker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.generation import TOKENIZER_FILE, SamplingParams, TextGenerator
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import BLOCK_TOKENS, blocks_for, predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.engine import Engine, TokenEvent

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]


def test_requests_joining_a_running_batch_get_what_they_get_alone(
    engine: Engine, served_model_dir: Path
) -> None:
    prompts = ["hello world", "a", "the quick brown fox", "xyz"]
    sinks = [Collector() for _ in prompts]
    engine.submit(prompts[0], GREEDY, sinks[0])
    engine.submit(prompts[1], GREEDY, sinks[1])
    for _ in range(3):
        engine.step()
    engine.submit(prompts[2], GREEDY, sinks[2])
    engine.step()
    engine.submit(prompts[3], SamplingParams(max_new_tokens=3, ignore_eos=True), sinks[3])
    run_until_idle(engine)
    generator = TextGenerator(
        ElasticLlama.from_pretrained(served_model_dir, packed=False), engine.tokenizer
    )
    for prompt, sink in zip(prompts, sinks, strict=True):
        max_new = 3 if prompt == "xyz" else 12
        (alone,) = generator.generate(
            [prompt], SamplingParams(max_new_tokens=max_new, ignore_eos=True)
        )
        assert sink.tokens == alone.token_ids
        assert sink.text == alone.text
        assert sink.finished == "length"
        assert [e.completion_tokens for e in sink.events] == list(range(1, max_new + 1))
    # A newcomer is prefilled and decoded in the iteration that admits it,
    # so its first two tokens share the running requests' step.
    assert [e.decode_step for e in sinks[2].events[:3]] == [3, 3, 4]
    assert [e.decode_step for e in sinks[0].events[:5]] == [0, 0, 1, 2, 3]
    assert engine.stats().picture.kv_reserved_bytes == 0  # idle: the cache is freed


@pytest.mark.usefixtures("one_thread")
def test_newcomers_are_held_back_to_share_a_prefill(served_model_dir: Path) -> None:
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE))
    engine = Engine(model, tokenizer, budget_bytes=2**26, prefill_group=3, max_admit_delay=2)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    engine.submit("first", params, Collector())
    engine.step()  # idle: admitted at once
    engine.submit("alone", params, Collector())
    for _ in range(2):  # held back while it waits alone, at most 2 iterations
        engine.step()
        assert engine.stats().queue_depth == 1
    engine.step()
    assert engine.stats().queue_depth == 0
    for prompt in ("a", "b", "c"):  # a group of 3 joins at the next step
        engine.submit(prompt, params, Collector())
    engine.step()
    assert [i.newcomers for i in engine.iterations] == [1, 0, 0, 1, 3]
    engine.close()


@pytest.mark.usefixtures("one_thread")
def test_a_long_prompt_is_fed_in_chunks_between_decode_steps(served_model_dir: Path) -> None:
    """Chunked prefill: the running request gets a token every step while a
    100-token prompt joins in chunks of step_tokens minus the decoding rows;
    both get exactly what they get alone."""
    engine = make_engine(served_model_dir, prefill_group=1, step_tokens=40)
    running, joining = Collector(), Collector()
    long_prompt = "the quick brown fox jumps over the lazy dog " * 2 + "and on and on"
    assert len(encode(engine, long_prompt)) == 101
    engine.submit("abc", SamplingParams(max_new_tokens=20, ignore_eos=True), running)
    engine.step()
    engine.submit(long_prompt, GREEDY, joining)
    prompt_tokens = engine.counters.prompt_tokens
    fed = []
    for _ in range(3):  # 39 + 39 + 23 tokens: one decoding row takes one of 40
        before = len(running.events)
        engine.step()
        assert len(running.events) == before + 1  # the running batch never stalls
        fed.append(engine.counters.prompt_tokens - prompt_tokens)
        prompt_tokens = engine.counters.prompt_tokens
    assert fed == [39, 39, 23]
    # The last chunk completed the prompt: its first token, then a decode step.
    assert len(joining.events) == 2
    assert all(i.prefill_s > 0 for i in list(engine.iterations)[-3:])
    run_until_idle(engine)
    assert running.tokens == alone(engine, served_model_dir, "abc", 20)
    assert joining.tokens == alone(engine, served_model_dir, long_prompt, 12)
    engine.close()


def test_eos_and_stop_strings_finish_a_request(engine: Engine) -> None:
    # Force the tiny model's choice: a huge temperature-free top-k of 1 is
    # greedy; find what it would say, then stop on its third character.
    probe = Collector()
    engine.submit("abc", SamplingParams(max_new_tokens=8, ignore_eos=True), probe)
    run_until_idle(engine)
    text = probe.text
    stop = text[2:4]
    sink = Collector()
    engine.submit("abc", SamplingParams(max_new_tokens=8, ignore_eos=True, stop=(stop,)), sink)
    run_until_idle(engine)
    assert sink.finished == "stop"
    assert sink.text == text[: text.find(stop)]
    assert stop not in sink.text

    # EOS: were the third greedy token the end of sequence, the request
    # would end there, without it, releasing its row.
    eos = probe.tokens[2]
    assert eos not in probe.tokens[:2]
    engine.model.config = dataclasses.replace(engine.model.config, eos_token_id=eos)
    ended = Collector()
    engine.submit("abc", SamplingParams(max_new_tokens=8), ended)
    run_until_idle(engine)
    assert ended.finished == "eos"
    assert ended.tokens == probe.tokens[:2]
    assert engine.stats().picture.active_sequences == 0


def test_cancel_frees_the_row_before_the_next_step(engine: Engine) -> None:
    sinks = [Collector() for _ in range(3)]
    ids = [engine.submit(p, GREEDY, s) for p, s in zip(["aa", "bbbb", "c"], sinks, strict=True)]
    engine.step()
    engine.step()
    used = engine.stats().picture.kv_used_bytes
    seen = len(sinks[0].events)
    assert engine.cancel(ids[0])
    engine.step()
    picture = engine.stats().picture
    assert picture.active_sequences == 2
    assert len(sinks[0].events) == seen  # nothing after the cancel
    # The cancelled row held 4 positions; the other two grew by one each.
    assert picture.kv_used_bytes < used
    assert not engine.cancel(ids[0])
    run_until_idle(engine)
    assert sinks[1].finished == sinks[2].finished == "length"
    assert engine.counters.requests_cancelled == 1
    assert engine.counters.requests_finished == 2


def test_bad_requests_are_refused_with_actionable_errors(engine: Engine) -> None:
    sink = Collector()
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        engine.submit("", GREEDY, sink)
    context = engine.model.config.max_position_embeddings
    with pytest.raises(InvalidArgument, match=f"context is {context}"):
        engine.submit("x" * context, GREEDY, sink)
    with pytest.raises(InvalidArgument, match="at most 128"):
        engine.submit("hi", GREEDY, sink, request_id="r" * 129)
    with pytest.raises(NotFound, match="serves no adapters"):
        engine.submit("hi", GREEDY, sink, adapter=AdapterRequest("code", "qa"))
    engine.submit("hi", GREEDY, sink, request_id="same")
    with pytest.raises(InvalidArgument, match="already in flight"):
        engine.submit("hi", GREEDY, sink, request_id="same")


def tight_engine(model_dir: Path, rows: int, tokens: int, max_queue: int) -> Engine:
    """An engine whose budget holds the weights and exactly the KV blocks of
    `rows` sequences of `tokens` positions, plus the scratch block."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    blocks = 1 + rows * blocks_for(tokens)
    budget = predict_memory(model.config, model.plan, blocks, BLOCK_TOKENS).total_bytes
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    return Engine(model, tokenizer, budget_bytes=budget, max_queue=max_queue)


@pytest.mark.usefixtures("one_thread")
def test_admission_waits_for_memory_and_refuses_when_the_queue_is_full(
    served_model_dir: Path,
) -> None:
    # Each request: 4 prompt tokens + 12 new = 16 positions at worst.
    engine = tight_engine(served_model_dir, rows=2, tokens=16, max_queue=2)
    sinks = [Collector() for _ in range(5)]
    for sink in sinks[:2]:
        engine.submit("abcd", GREEDY, sink)
    engine.step()
    for sink in sinks[2:4]:
        engine.submit("abcd", GREEDY, sink)
    with pytest.raises(ResourceExhausted, match="wait queue is full"):
        engine.submit("abcd", GREEDY, sinks[4])
    with pytest.raises(ResourceExhausted, match="even on an idle worker"):
        engine.submit("abcd", SamplingParams(max_new_tokens=100), Collector())
    engine.step()
    assert engine.stats().picture.active_sequences == 2
    assert engine.stats().queue_depth == 2
    budget = engine.admission.budget_bytes
    while engine.step():
        picture = engine.stats().picture
        measured = account(engine.model, engine._cache)
        assert picture.kv_reserved_bytes == measured.kv_reserved_bytes
        assert picture.total_bytes <= budget
    assert all(s.finished == "length" for s in sinks[:4])
    # The third request started only when the first two had finished.
    assert sinks[2].events[0].decode_step >= sinks[0].events[-1].decode_step
    assert engine.counters.requests_refused == 2
    engine.close()


def test_a_queued_request_that_no_longer_fits_is_refused(engine: Engine) -> None:
    running, queued = Collector(), Collector()
    engine.max_queue = 4
    engine.admission.max_rows = 1
    engine.submit("abcd", GREEDY, running)
    engine.step()
    engine.submit("abcd", SamplingParams(max_new_tokens=100), queued)
    weights = engine.stats().picture.weight_bytes
    # A budget with room for the running request's one block of 16 positions
    # (and scratch) but not for 104 positions.
    budget = weights + predict_memory(engine.model.config, None, 2, BLOCK_TOKENS).kv_bytes
    engine.submit_plan(engine.model.plan, "squeezed", budget_bytes=budget)
    run_until_idle(engine)
    assert running.finished == "length"
    assert len(queued.errors) == 1 and isinstance(queued.errors[0], ResourceExhausted)
    assert "no longer fit" in str(queued.errors[0])
    assert engine.counters.requests_refused == 1


@pytest.mark.usefixtures("one_thread")
def test_admission_charges_blocks_with_a_growth_window(served_model_dir: Path) -> None:
    """Rows of different lengths cost their own blocks, not the longest
    row's: a rectangular cache of this budget would hold two of these."""
    engine = tight_engine(served_model_dir, rows=2, tokens=64, max_queue=8)  # 8 blocks + scratch
    engine.admission.growth_tokens = 16
    engine.submit("a" * 40, SamplingParams(max_new_tokens=24, ignore_eos=True), Collector())
    for _ in range(5):  # 4 + 12 positions, one block each
        engine.submit("abcd", GREEDY, Collector())
    engine.step()
    picture = engine.stats().picture
    assert picture.active_sequences == 5 and engine.stats().queue_depth == 1
    # Charged after a step: min(64, 42 + 1 + 16) -> 4 blocks for the long
    # one (41 positions in 3 blocks), one block for each short one.
    assert picture.kv_blocks_committed == 4 + 4
    assert picture.kv_blocks_in_use == 3 + 4
    assert picture.kv_blocks_reserved == 1 + 4 + 4
    per_block = predict_memory(engine.model.config, None, 1, BLOCK_TOKENS).kv_bytes
    assert picture.kv_reserved_bytes == picture.kv_blocks_reserved * per_block
    assert picture.total_bytes <= engine.admission.budget_bytes
    run_until_idle(engine)
    assert engine.counters.requests_finished == 6
    assert engine.counters.preemptions == 0
    engine.close()


LEVEL_PLANS = (
    # Quantizes three blocks and drops two, two KV caches to int8; then
    # promotes, demotes and restores blocks, and one KV cache goes back to
    # full (its tokens dequantized) while another goes to int8 (quantized).
    PruningPlan.from_levels(
        ["full", "int8", "int4", "int8", "full", "dropped", "int8", "dropped"],
        ["int8", "full", "int8", "full"],
    ),
    PruningPlan.from_levels(
        ["int4", "full", "int4", "dropped", "int8", "int8", "full", "full"],
        ["full", "int8", "int8", "full"],
    ),
)


@pytest.mark.parametrize(
    "pair",
    [
        (
            PruningPlan.from_dropped(4, attention=[1], ffn=[2]),
            PruningPlan.from_dropped(4, attention=[3], ffn=[2]),  # restores attention 1
        ),
        LEVEL_PLANS,
    ],
    ids=["pruning", "levels"],
)
def test_plan_switches_follow_the_documented_semantics(
    engine: Engine, reference_tokens: Reference, pair: tuple[PruningPlan, PruningPlan]
) -> None:
    first, second = pair
    sinks = {p: Collector() for p in ["hello", "abc", "zz top", "late"]}
    engine.submit("hello", GREEDY, sinks["hello"])
    engine.submit("abc", GREEDY, sinks["abc"])
    engine.step()
    engine.step()
    switch1 = engine.submit_plan(first, "p1")
    engine.step()
    engine.submit("zz top", GREEDY, sinks["zz top"])
    engine.step()
    engine.step()
    switch2 = engine.submit_plan(second, "p2")
    engine.step()
    # The pools hold what the memory model counts under the new plan: its
    # kept attention blocks, each KV cache at its level.
    picture = engine.stats().picture
    per_block = predict_memory(engine.model.config, second, 1, BLOCK_TOKENS).kv_bytes
    assert picture.kv_reserved_bytes == picture.kv_blocks_reserved * per_block > 0
    engine.submit("late", GREEDY, sinks["late"])
    run_until_idle(engine)
    one, two = switch1.result(timeout=1), switch2.result(timeout=1)
    assert one.plan_id == "p1" and two.plan_id == "p2"
    assert one.effective_step == 2 and two.effective_step == 5
    assert one.bytes_after < one.bytes_before  # attention 1 and FFN 2 dropped
    plans = [(one.effective_step, first), (two.effective_step, second)]
    starts: dict[str, PruningPlan | None] = {"hello": None, "abc": None, "zz top": first}
    starts["late"] = second
    for prompt, sink in sinks.items():
        switches = {}
        for step, plan in plans:
            index = sum(1 for e in sink.events if e.decode_step < step)
            if 0 < index < len(sink.tokens):
                switches[index] = plan
        expected = reference_tokens(encode(engine, prompt), 12, starts[prompt], switches)
        assert sink.tokens == expected, prompt
        for event in sink.events:
            step = event.decode_step
            assert event.plan_id == ("p2" if step >= 5 else "p1" if step >= 2 else "initial")
    # The running requests saw two switches, one with a restored block.
    assert len({e.plan_id for e in sinks["hello"].events}) == 3


@pytest.mark.usefixtures("one_thread")
def test_restored_attention_attends_from_the_switch_only(reference_tokens: Reference) -> None:
    """The reference above is not vacuous: with a restored block, history
    from before the switch is really not attended to."""
    layers = 4
    dropped = PruningPlan.from_dropped(layers, attention=[0, 1, 2])
    dense = PruningPlan.dense(layers)
    prompt = [10, 20, 30, 40, 50, 60]
    restored = reference_tokens(prompt, 10, dropped, {3: dense})
    full = reference_tokens(prompt, 10, dropped, {})
    assert restored[:3] == full[:3]
    assert restored != full


def alone(engine: Engine, model_dir: Path, prompt: str, max_new: int) -> list[int]:
    """Greedy tokens of `prompt` generated alone, outside the engine."""
    generator = TextGenerator(
        ElasticLlama.from_pretrained(model_dir, packed=False), engine.tokenizer
    )
    (completion,) = generator.generate(
        [prompt], SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    )
    return completion.token_ids


def test_a_squeeze_preempts_the_youngest_which_resume_with_the_same_tokens(
    engine: Engine, served_model_dir: Path
) -> None:
    prompts = ["hello world", "abc", "zz top", "the quick brown fox"]
    sinks = [Collector() for _ in prompts]
    for prompt, sink in zip(prompts, sinks, strict=True):
        engine.submit(prompt, GREEDY, sink)
    for _ in range(3):
        engine.step()
    weights = engine.stats().picture.weight_bytes
    per_block = predict_memory(engine.model.config, None, 1, BLOCK_TOKENS).kv_bytes
    squeezed = weights + 3 * per_block  # scratch + one block for each of two requests
    future = engine.submit_plan(engine.model.plan, "squeeze", budget_bytes=squeezed)
    step = engine.step_count
    engine.step()
    switch = future.result(timeout=1)
    assert switch.preempted == 2 and switch.effective_step == step
    assert switch.after.total_bytes <= squeezed
    assert engine.stats().picture.active_sequences == 2
    assert engine.stats().queue_depth == 2
    assert len(sinks[3].events) == len(sinks[2].events) == 4  # no token since the squeeze
    while engine.step():
        picture = engine.stats().picture
        assert picture.total_bytes <= squeezed
        assert picture.kv_reserved_bytes == account(engine.model, engine._cache).kv_reserved_bytes
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert sink.finished == "length" and not sink.errors
        assert [e.completion_tokens for e in sink.events] == list(range(1, 13))
        assert sink.tokens == alone(engine, served_model_dir, prompt, 12), prompt
    assert engine.counters.preemptions >= 2 and engine.counters.requests_failed == 0
    # The two oldest kept running; the preempted resumed only once they had room.
    assert sinks[2].events[4].decode_step > sinks[1].events[-1].decode_step


@pytest.mark.usefixtures("one_thread")
def test_sequences_that_outgrow_their_window_preempt_the_youngest(served_model_dir: Path) -> None:
    """With no growth window, four requests are admitted on one block each;
    as they grow past it the budget (4 blocks) runs out, the youngest are
    preempted and recomputed later, and every one ends with its own tokens."""
    engine = tight_engine(served_model_dir, rows=4, tokens=16, max_queue=8)
    engine.admission.growth_tokens = 0
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = ["abcd", "efgh", "ijkl", "mnop"]
    sinks = [Collector() for _ in prompts]
    for prompt, sink in zip(prompts, sinks, strict=True):
        engine.submit(prompt, params, sink)
    engine.step()
    assert engine.stats().picture.active_sequences == 4
    budget = engine.admission.budget_bytes
    while engine.step():
        picture = engine.stats().picture
        assert picture.total_bytes <= budget
        assert picture.kv_blocks_reserved <= 5  # scratch and 4 blocks: the budget
        if picture.active_sequences:
            assert picture.kv_blocks_in_use < picture.kv_blocks_reserved
    assert engine.counters.preemptions >= 2 and engine.counters.requests_failed == 0
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert sink.finished == "length" and not sink.errors
        assert [e.completion_tokens for e in sink.events] == list(range(1, 41))
        assert sink.tokens == alone(engine, served_model_dir, prompt, 40), prompt
    engine.close()


def test_a_newer_plan_supersedes_one_not_yet_applied(engine: Engine) -> None:
    layers = engine.model.config.num_hidden_layers
    older = engine.submit_plan(PruningPlan.from_dropped(layers, ffn=[1]), "older")
    newer = engine.submit_plan(PruningPlan.from_dropped(layers, ffn=[2]), "newer")
    engine.step()
    with pytest.raises(FailedPrecondition, match="superseded by plan 'newer'"):
        older.result(timeout=1)
    assert newer.result(timeout=1).plan_id == "newer" == engine.plan_id
    with pytest.raises(InvalidArgument, match="plan is for 2 layers"):
        engine.submit_plan(PruningPlan.dense(2), "wrong")
    with pytest.raises(FailedPrecondition, match="weights and the loaded adapters alone"):
        engine.submit_plan(PruningPlan.dense(layers), "tiny budget", budget_bytes=1000)


def test_request_mix_and_throughput_are_reported(engine: Engine) -> None:
    for prompt in ["a", "bb", "ccc"]:
        engine.submit(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True), Collector())
    run_until_idle(engine)
    stats = engine.stats()
    mix = stats.mix
    assert mix.finished_requests == 3
    assert sum(mix.prompt_tokens.counts) == 3
    assert sum(mix.output_tokens.counts) == 3
    assert mix.batch_size_p90 == 3
    assert mix.sequence_tokens_p90 == 8
    assert mix.tokens_per_second > 0
    assert stats.picture.decode_step == 4  # the first step also prefilled
    assert engine.counters.generated_tokens == 15
    first, *rest = engine.iterations
    assert (first.newcomers, first.rows) == (3, 3) and 0 < first.prefill_s < first.seconds
    assert all(i.newcomers == 0 and i.prefill_s == 0 and i.step_s > 0 for i in rest)


def test_background_thread_serves_and_drains(engine: Engine) -> None:
    engine.start()
    done = threading.Event()
    sinks = [Collector() for _ in range(6)]

    def finish_last(event: TokenEvent | Exception) -> None:
        sinks[-1](event)
        if isinstance(event, TokenEvent) and event.finish_reason:
            done.set()

    for sink in sinks[:-1]:
        engine.submit("some prompt", GREEDY, sink)
    engine.submit("last", GREEDY, finish_last)
    assert engine.drain(timeout_s=30)
    assert done.is_set()
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit("more", GREEDY, Collector())
    engine.close()
    assert all(s.finished == "length" for s in sinks)


def test_close_fails_what_is_left_with_unavailable(engine: Engine) -> None:
    sink = Collector()
    engine.submit("never run", GREEDY, sink)
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    assert len(sink.errors) == 1 and isinstance(sink.errors[0], Unavailable)


def _observed(engine: Engine, name: str) -> tuple[float, float]:
    """How many times the engine's `name` histogram was observed, and their sum."""
    histogram = getattr(engine.latency, name)
    (family,) = histogram.collect()
    figures = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples}
    return figures["count"], figures["sum"]


def test_latency_histograms_time_each_request_step_and_switch(engine: Engine) -> None:
    layers = engine.model.config.num_hidden_layers
    long_params = dataclasses.replace(GREEDY, max_new_tokens=6, ignore_eos=True)
    one_token = dataclasses.replace(GREEDY, max_new_tokens=1, ignore_eos=True)
    sinks = [Collector(), Collector(), Collector()]
    engine.submit("hello", long_params, sinks[0])
    engine.submit("abc", one_token, sinks[1])
    cancelled = engine.submit("zz", long_params, sinks[2])
    engine.step()  # all three prefilled together; "abc" is done
    engine.cancel(cancelled)
    engine.submit_plan(PruningPlan.from_dropped(layers, ffn=[1]), "smaller")
    run_until_idle(engine)
    decode_steps = sum(1 for i in engine.iterations if i.rows)
    assert _observed(engine, "queue_wait")[0] == 3
    assert _observed(engine, "prefill")[0] == 1
    assert _observed(engine, "time_to_first_token")[0] == 3
    assert _observed(engine, "plan_switch")[0] == 1
    assert _observed(engine, "decode_step")[0] == decode_steps
    # Finished requests only; a time per output token needs a second token.
    assert _observed(engine, "request_duration")[0] == 2
    assert _observed(engine, "time_per_output_token")[0] == 1
    assert _observed(engine, "time_to_first_token")[1] > 0
    assert _observed(engine, "request_duration")[1] > 0
