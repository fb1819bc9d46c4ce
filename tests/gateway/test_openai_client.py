"""The gateway's OpenAI API through PyPI's `openai` client (a client nobody
here wrote), against real worker processes over real sockets, adapters
from a real Valkey: chat completions streamed and not, completions,
models.list, and the client's error classes for what the gateway refuses."""

from __future__ import annotations

import openai
import pytest
from fleet_helpers import ADAPTER, GATEWAY_TOKEN, MODEL, TASKS, Fleet
from openai.types.chat import ChatCompletionMessageParam

from elasticfleet.gateway.openai_api import DEFAULT_SYSTEM_PROMPT, render_chat
from elasticfleet.worker.model.generation import DEFAULT_SYSTEM_PROMPT as WORKER_SYSTEM
from elasticfleet.worker.model.generation import chat_prompt

pytest_plugins = ["serving_fixtures", "gateway_fixtures"]


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    # No retries: a refusal must reach the test as the gateway sent it.
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=GATEWAY_TOKEN, max_retries=0)


def test_chat_completion_whole_and_streamed_agree(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]
    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
    )
    (choice,) = whole.choices
    assert whole.object == "chat.completion" and whole.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_completions_with_an_adapter_task_and_a_stop(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    tuned = client.completions.create(
        model=f"{ADAPTER}:qa", prompt="abc", max_tokens=6, temperature=0
    )
    assert base.object == "text_completion" and tuned.model == f"{ADAPTER}:qa"
    assert base.choices[0].finish_reason == "length" and len(base.choices[0].text) > 0
    streamed = client.completions.create(
        model=f"{ADAPTER}:qa", prompt="abc", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == tuned.choices[0].text
    # A stop string that the text holds ends it there, finish reason "stop".
    stop = tuned.choices[0].text[2:4]
    if stop:
        cut = client.completions.create(
            model=f"{ADAPTER}:qa", prompt="abc", max_tokens=6, temperature=0, stop=[stop]
        )
        assert cut.choices[0].finish_reason == "stop"
        assert stop not in cut.choices[0].text and tuned.choices[0].text.startswith(
            cut.choices[0].text
        )


def test_models_lists_the_base_model_and_every_served_task(
    client: openai.OpenAI, fleet: Fleet
) -> None:
    for task in TASKS:  # each task served somewhere
        client.completions.create(model=f"{ADAPTER}:{task}", prompt="x", max_tokens=1)
    fleet.loop.run(fleet.gateway.service.pool._refresh())
    ids = [model.id for model in client.models.list()]
    assert ids[0] == MODEL
    assert {f"{ADAPTER}:{task}" for task in TASKS} <= set(ids)


def test_errors_arrive_as_the_clients_error_classes(client: openai.OpenAI, fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="`n` is not supported"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_perplexity_ratio"):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"max_perplexity_ratio": 0.5}
        )
    with pytest.raises(openai.NotFoundError, match="no-such-set"):
        client.completions.create(model="no-such-set:qa", prompt="x", max_tokens=1)
    stranger = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_chat_rendering_matches_the_workers_template() -> None:
    assert DEFAULT_SYSTEM_PROMPT == WORKER_SYSTEM
    assert render_chat([{"role": "user", "content": "hi"}]) == chat_prompt("hi")
    halves = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    parts = [{"role": "user", "content": halves}]
    assert render_chat(parts) == chat_prompt("hi")
    turns = render_chat(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"},
        ]
    )
    assert turns == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
