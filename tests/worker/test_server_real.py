"""End to end with the real SmolLM2-135M-Instruct: a worker on 127.0.0.1
answers a chat prompt over gRPC exactly as the model does in-process, and a
plan pushed over gRPC frees the memory the memory model says it should."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticfleet.worker.model.generation import (
    SamplingParams,
    TextGenerator,
    chat_prompt,
    load_tokenizer,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]

QUESTION = "What is the capital of France?"


@pytest.mark.real_model
def test_real_model_end_to_end(real_model_dir: Path, one_thread: None) -> None:
    model = ElasticLlama.from_pretrained(real_model_dir)
    tokenizer = load_tokenizer(real_model_dir)
    params = SamplingParams(max_new_tokens=16)
    (expected,) = TextGenerator(model, tokenizer).generate([chat_prompt(QUESTION)], params)
    assert "Paris" in expected.text
    config = model.config
    budget = predict_memory(config, model.plan, 8, 1024).total_bytes
    engine = Engine(model, tokenizer, budget_bytes=budget)
    server = BackgroundServer(engine, ServerOptions(model_name="SmolLM2-135M-Instruct"))
    try:
        with WorkerClient(f"127.0.0.1:{server.port}") as client:
            request = generate_request(QUESTION, max_new_tokens=16, chat_template=True)
            result = client.complete(request, timeout=120)
            assert result.text == expected.text
            assert result.token_ids == expected.token_ids
            assert result.finish_reason == expected.finish_reason

            plan = PruningPlan.from_dropped(config.num_hidden_layers, attention=[25, 26, 27])
            switch = client.apply_plan("drop-3-attention", plan.to_mask(), timeout=60)
            freed = switch.bytes_before - switch.bytes_after
            dense_weights = predict_memory(config, None, 0, 0).weight_bytes
            assert freed == dense_weights - predict_memory(config, plan, 0, 0).weight_bytes
            stats = client.get_stats()
            assert stats.model == "SmolLM2-135M-Instruct" and stats.plan_id == "drop-3-attention"
            assert stats.memory.weight_bytes == predict_memory(config, plan, 0, 0).weight_bytes
            pruned = client.complete(request, timeout=120)
            assert pruned.token_ids and {m.plan_id for m in pruned.messages} == {"drop-3-attention"}
    finally:
        server.stop()
