"""Fixtures shared by every component's tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from tokenizers import Tokenizer, models
from valkey_server import TestRedisServer, TlsFront, self_signed_certificate

from elasticfleet.agent.profiling import profile_model
from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama

# The name the tiny model is served and profiled under.
TINY_MODEL = "tiny-llama"


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


@pytest.fixture
def tiny_profiles(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The tiny model's block profile (two steps of Greedy Sequential
    Importance over its 8 blocks, the proxy ranking the rest) in a folder
    named by $ELASTICFLEET_PROFILES, where the operator looks for profiles."""
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    folder = tmp_path / "profiles"
    folder.mkdir()
    out = folder / f"{TINY_MODEL}.json"
    profile_model(model, tokens, out_path=out, progress=False, model_name=TINY_MODEL)
    monkeypatch.setenv("ELASTICFLEET_PROFILES", str(folder))
    yield folder


@pytest.fixture
def tiny_worker_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's files and a tokenizer that names every id (`<7>`) in
    a folder named `tiny-llama`, so `elasticfleet worker --model DIR` serves
    it under that name (a worker reports its model folder's name)."""
    path = tmp_path / TINY_MODEL
    shutil.copytree(tiny_model_dir, path)
    vocabulary = {f"<{i}>": i for i in range(tiny_config().vocab_size)}
    Tokenizer(models.WordLevel(vocabulary, unk_token="<0>")).save(str(path / TOKENIZER_FILE))
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
    from elasticfleet.worker.model.prepare import prepare_model

    return prepare_model(progress=False)


# -- Redis (a real Valkey server; see tests/valkey_server.py) --------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[TestRedisServer]:
    """One Valkey server for the whole session, on a free loopback port."""
    server = TestRedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: TestRedisServer) -> Iterator[str]:
    """The session server's URL, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def store(redis_url: str) -> Iterator[AdapterStore]:
    """An adapter store on the (flushed) session server."""
    store = AdapterStore.from_url(redis_url)
    yield store
    store.close()


@pytest.fixture
def raw(redis_server: TestRedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at and tamper with what the store wrote."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def restartable_redis() -> Iterator[TestRedisServer]:
    """A server of this test's own (with AOF, so data survives a restart),
    for tests that stop and restart Redis."""
    server = TestRedisServer(persist=True)
    server.start()
    yield server
    server.close()


# (in, out) features of each projection in the small random adapters below.
_ADAPTER_SHAPES = {
    "q_proj": (16, 16),
    "k_proj": (16, 8),
    "v_proj": (16, 8),
    "o_proj": (16, 16),
    "gate_proj": (16, 32),
    "up_proj": (16, 32),
    "down_proj": (32, 16),
}


@pytest.fixture
def make_adapter() -> Callable[..., AdapterWeights]:
    """Builds small random adapter sets (2 layers, every module):
    make_adapter(name="demo", tasks=("code", "qa", "defs"), router=True, seed=0, rank=4)."""

    def build(
        name: str = "demo",
        tasks: tuple[str, ...] = ("code", "qa", "defs"),
        *,
        router: bool = True,
        seed: int = 0,
        rank: int = 4,
    ) -> AdapterWeights:
        spec = AdapterSpec(
            name=name,
            base_model=TINY_MODEL,
            num_layers=2,
            rank=rank,
            alpha=2.0 * rank,
            modules=tuple(_ADAPTER_SHAPES),
            tasks=tasks,
            router=router,
        )
        generator = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(spec.num_layers):
            for module, (fan_in, fan_out) in _ADAPTER_SHAPES.items():
                prefix = f"layers.{layer}.{module}"
                tensors[f"{prefix}.A"] = torch.randn(spec.rank, fan_in, generator=generator)
                for task in tasks:
                    tensors[f"{prefix}.B.{task}"] = torch.randn(
                        fan_out, spec.rank, generator=generator
                    )
                if router:
                    tensors[f"{prefix}.router"] = torch.randn(
                        len(tasks), fan_in, generator=generator
                    )
        return AdapterWeights(spec, tensors)

    return build


@pytest.fixture(scope="session")
def tls_redis(
    redis_server: TestRedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """(rediss:// URL, CA certificate) of a TLS front to the session server;
    skipped where the openssl command is missing."""
    pair = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    if pair is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = pair
    front = TlsFront(redis_server.port, cert, key)
    yield f"rediss://127.0.0.1:{front.port}/0", cert
    front.close()
