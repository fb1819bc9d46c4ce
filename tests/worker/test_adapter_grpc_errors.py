"""LoadAdapter through a real gRPC worker answers a precise status code for
each way an adapter can be wrong (it answered INTERNAL for all of these),
with a message of bounded length."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest
import redis
from test_lora import make_spec, trained
from tokenizers import Tokenizer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.layer import AdapterSet
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving.client import WorkerClient
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

pytest_plugins = ["serving_fixtures"]


def _publish_broken_adapters(store: AdapterStore, raw: redis.Redis) -> None:
    """'wide': another model's widths; 'nested': a manifest nested 50,000
    deep; 'garbage': a blob (its digest in the manifest) that is not safetensors."""
    wide = ElasticLlama(tiny_config(hidden_size=96)).config
    store.publish(AdapterSet.create(make_spec("wide"), wide, seed=1).weights())
    store.publish(trained(make_spec("nested"), seed=2).weights())
    raw.set("elasticfleet:adapter:nested:manifest:1", b"[" * 50_000 + b"]" * 50_000)
    manifest = store.publish(trained(make_spec("garbage"), seed=3).weights())
    blob = b"\xff" * 32
    document = json.loads(manifest.to_json())
    document["parts"]["A/0"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    raw.set("elasticfleet:adapter:garbage:manifest:1", json.dumps(document))
    raw.set("elasticfleet:adapter:garbage:blob:1:A/0", blob)


def test_load_adapter_answers_precise_codes(
    served_model_dir: Path, redis_url: str, raw: redis.Redis, one_thread: None
) -> None:
    store = AdapterStore.from_url(redis_url)
    _publish_broken_adapters(store, raw)
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE))
    host = CachedAdapterHost(AdapterCache(store, 8 << 20), model.config, model.plan)
    engine = Engine(model, tokenizer, budget_bytes=64 << 20, adapters=host)
    running = BackgroundServer(engine, ServerOptions(model_name="tiny"))
    expected = {
        # Refused at the API for its length, before the adapter code sees it.
        "n" * 10_000: (grpc.StatusCode.INVALID_ARGUMENT, "name has 10000 characters; at most 128"),
        "Bad.Name": (grpc.StatusCode.INVALID_ARGUMENT, "adapter name 'Bad.Name' is invalid"),
        "wide": (grpc.StatusCode.FAILED_PRECONDITION, "does not fit this worker's model"),
        "nested": (grpc.StatusCode.DATA_LOSS, "manifest is unreadable: it is nested too deeply"),
        "garbage": (grpc.StatusCode.DATA_LOSS, "part A/0 is not safetensors"),
    }
    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            for name, (code, message) in expected.items():
                with pytest.raises(grpc.RpcError) as caught:
                    client.load_adapter(name)
                assert caught.value.code() == code, name[:20]
                details = caught.value.details() or ""
                assert message in details and len(details) < 300, details[:300]
            assert list(client.list_adapters().adapters) == []
    finally:
        running.stop()
