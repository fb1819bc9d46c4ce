"""Adapters end to end: a set published to a real Valkey, loaded by a real
gRPC worker through the Redis-backed adapter host, and used per request in
one batch with rows on different heads and rows with no adapter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from test_lora import make_spec, trained
from tokenizers import Tokenizer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.layer import AdapterBatch
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

pytest_plugins = ["serving_fixtures"]

PROMPT = "adapt me"
NEW_TOKENS = 6


def greedy(model: ElasticLlama, ids: list[int], batch: AdapterBatch | None) -> list[int]:
    """The reference: plain greedy decoding of one row, recomputing from scratch."""
    tokens = list(ids)
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([tokens]), adapters=batch)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(ids) :]


def test_worker_serves_adapters_from_redis(
    served_model_dir: Path, redis_url: str, one_thread: None
) -> None:
    published = trained(make_spec(), seed=31)
    store = AdapterStore.from_url(redis_url)
    store.publish(published.weights())
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE))
    host = CachedAdapterHost(AdapterCache(store, 8 << 20), model.config, model.plan)
    engine = Engine(model, tokenizer, budget_bytes=64 << 20, adapters=host)
    running = BackgroundServer(engine, ServerOptions(model_name="tiny"))
    reference = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    expected = {
        "qa": greedy(reference, ids, AdapterBatch.single(published, 1, "qa")),
        "code": greedy(reference, ids, AdapterBatch.single(published, 1, "code")),
        None: greedy(reference, ids, None),
    }
    assert expected["qa"] != expected[None] or expected["code"] != expected[None]
    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            with pytest.raises(grpc.RpcError) as missing:
                client.complete(
                    generate_request(PROMPT, max_new_tokens=2, adapter="multi", task="qa")
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            loaded = client.load_adapter("multi", tasks=["qa", "code"])
            assert not loaded.cache_hit and list(loaded.adapter.tasks) == ["qa", "code"]
            assert client.get_stats().memory.adapter_bytes > 0
            requests = {
                task: generate_request(
                    PROMPT,
                    max_new_tokens=NEW_TOKENS,
                    ignore_eos=True,
                    adapter=None if task is None else "multi",
                    task=task,
                )
                for task in ("qa", "code", None)
            }
            # Issued together, so the engine batches rows on both heads and a plain row.
            with ThreadPoolExecutor(len(requests)) as pool:
                results = list(pool.map(client.complete, requests.values()))
            for task, result in zip(requests, results, strict=True):
                assert result.token_ids == expected[task], task
            with pytest.raises(grpc.RpcError) as unknown:
                client.complete(
                    generate_request(PROMPT, max_new_tokens=2, adapter="multi", task="defs")
                )
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert client.unload_adapter("multi").bytes_freed > 0
    finally:
        running.stop()
