"""Generation on the tiny model with a character-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from elasticfleet.worker.model.generation import (
    Completion,
    FinishRules,
    SamplingParams,
    TextGenerator,
    TextStream,
    filter_logits,
    load_tokenizer,
)
from elasticfleet.worker.model.llama import ElasticLlama

CHARS = [chr(c) for c in range(32, 127)]


def char_tokenizer() -> Tokenizer:
    """Ids 0..2 are specials; printable ASCII follows; the rest of the tiny
    model's 256-token vocabulary decodes to '#'."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(CHARS)})
    vocab.update({f"#{i}": i for i in range(len(vocab), 256)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture
def generator(tiny_model: ElasticLlama) -> TextGenerator:
    return TextGenerator(tiny_model, char_tokenizer())


PROMPTS = ["hello world", "a", "the quick brown fox"]


def test_batch_equals_each_prompt_alone(generator: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=10)
    batched = generator.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        (alone,) = generator.generate([prompt], params)
        assert result.token_ids == alone.token_ids
        assert result.prompt_tokens == len(prompt)


def test_greedy_picks_the_argmax_chain(generator: TextGenerator) -> None:
    (result,) = generator.generate_ids([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    ids = [5, 6, 7]
    with torch.inference_mode():
        for _ in range(4):
            ids.append(int(generator.model(torch.tensor([ids]))[0, -1].argmax()))
    expected = ids[3:]
    if generator.eos_token_id in expected:
        expected = expected[: expected.index(generator.eos_token_id)]
    assert result.token_ids == expected


def test_seeded_sampling_is_reproducible(generator: TextGenerator) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed)
        return generator.generate(["abc"], params)[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_is_greedy(generator: TextGenerator) -> None:
    greedy = generator.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    top1 = generator.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1]


def test_mixed_sampling_parameters_in_one_batch(generator: TextGenerator) -> None:
    params = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=7, temperature=1.0)]
    results = generator.generate(["xy", "zz"], params)
    assert [len(r.token_ids) for r in results] == [3, 7]
    assert all(r.finish_reason == "length" for r in results)
    assert results[0].token_ids == generator.generate(["xy"], params[0])[0].token_ids


def test_filter_logits() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True, True]
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0]) + 0.01))
    assert kept.tolist() == [True, True, False, False, False]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.5))
    assert kept.tolist() == [True, False, False, False, False]


def test_stop_strings_and_eos(generator: TextGenerator) -> None:
    (free,) = generator.generate(["hello"], SamplingParams(max_new_tokens=12))
    text = free.text
    stop = next(c for c in text[2:] if c in CHARS)
    (stopped,) = generator.generate(["hello"], SamplingParams(max_new_tokens=12, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]

    generator.eos_token_id = free.token_ids[0]
    (ended,) = generator.generate(["hello"], SamplingParams(max_new_tokens=12))
    assert ended.finish_reason == "eos"
    assert ended.token_ids == []


RULES = FinishRules(eos_token_id=2, context=10)


def finish_reasons(
    tokens: list[int], params: SamplingParams, prompt_tokens: int = 1
) -> tuple[list[str], list[int]]:
    """Feed `tokens` one at a time through RULES (a token decodes as
    chr(token)); the finish reason after each, and the tokens kept."""
    kept: list[int] = []
    reasons = [
        RULES.add(token, kept, prompt_tokens, params, lambda: "".join(map(chr, kept)))
        for token in tokens
    ]
    return reasons, kept


def test_finish_rules_end_on_eos_without_keeping_it() -> None:
    assert finish_reasons([65, 2], SamplingParams(max_new_tokens=5)) == (["", "eos"], [65])


def test_finish_rules_keep_eos_when_told_to_ignore_it() -> None:
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    assert finish_reasons([2, 2, 2], params) == (["", "", "length"], [2, 2, 2])


def test_finish_rules_stop_on_a_stop_string_across_tokens() -> None:
    params = SamplingParams(max_new_tokens=5, stop=("BC",))
    reasons, kept = finish_reasons([ord("A"), ord("B"), ord("C")], params)
    assert reasons == ["", "", "stop"] and kept == [65, 66, 67]  # the caller cuts the text


def test_finish_rules_prefer_stop_to_length() -> None:
    params = SamplingParams(max_new_tokens=2, stop=("B",))
    assert finish_reasons([ord("A"), ord("B")], params)[0] == ["", "stop"]


def test_finish_rules_end_at_max_new_tokens() -> None:
    assert finish_reasons([65, 66, 67], SamplingParams(max_new_tokens=3))[0] == ["", "", "length"]


def test_finish_rules_end_at_the_models_context() -> None:
    # 8 prompt tokens + 2 new ones fill the context of 10 before max_new_tokens.
    params = SamplingParams(max_new_tokens=50)
    assert finish_reasons([65, 66], params, prompt_tokens=8) == (["", "length"], [65, 66])


def test_finish_rules_decode_only_for_stop_strings() -> None:
    def no_text() -> str:
        raise AssertionError("decoded without stop strings")

    assert RULES.add(65, [], 1, SamplingParams(max_new_tokens=5), no_text) == ""


def test_streaming_callback_sees_every_token(generator: TextGenerator) -> None:
    seen: dict[int, list[int]] = {0: [], 1: []}
    results = generator.generate(
        ["ab", "cde"],
        SamplingParams(max_new_tokens=6),
        on_token=lambda row, token: seen[row].append(token),
    )
    assert [seen[0], seen[1]] == [r.token_ids for r in results]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_invalid_sampling_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_bad_prompts(generator: TextGenerator) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        generator.generate([""])
    context = generator.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="does not fit the context"):
        generator.generate_ids([[5] * context])
    with pytest.raises(ValueError, match="2 prompts but 1 sampling"):
        generator.generate(["a", "b"], [SamplingParams()])


def test_text_stream_never_shows_a_stop_string() -> None:
    tokenizer = char_tokenizer()
    ids = tokenizer.encode("one two END three").ids
    stream = TextStream(tokenizer, stop=("END",))
    shown = "".join(stream.push(token) for token in ids)
    assert "E" not in shown
    assert shown == "one two "
    final = Completion(prompt_tokens=1, token_ids=ids, text="one two ", finish_reason="stop")
    assert stream.finish(final) == ""


def test_text_stream_releases_a_false_start() -> None:
    tokenizer = char_tokenizer()
    stream = TextStream(tokenizer, stop=("END",))
    pieces = [stream.push(token) for token in tokenizer.encode("EN!").ids]
    assert pieces == ["", "", "EN!"]
    ids = tokenizer.encode("EN!").ids
    assert stream.finish(Completion(1, ids, "EN!", "length")) == ""


@pytest.mark.real_model
def test_text_stream_holds_back_partial_utf8(real_model_dir: Path) -> None:
    """SmolLM2 spells the snowman with byte tokens that decode to U+FFFD alone."""
    tokenizer = load_tokenizer(real_model_dir)
    ids = tokenizer.encode("a ☃ b").ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == "a ☃ b"
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces
