"""Model configuration: the subset of a Hugging Face Llama config.json that the
elastic model, the memory model and the planner all need.

One dataclass is shared by all of them so that a figure computed by the
operator and one computed by the worker can never disagree about shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-architecture decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "num_attention_heads must be a multiple of num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )

    @property
    def num_blocks(self) -> int:
        """Prunable blocks: one attention and one FFN block per layer."""
        return 2 * self.num_hidden_layers

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face LlamaConfig dictionary (config.json)."""
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id", 2)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            bos_token_id=int(raw.get("bos_token_id", 1)),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' LlamaForCausalLM loads as the same model."""
        raw: dict[str, Any] = asdict(self)
        raw.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_scaling=None,
            torch_dtype="float32",
        )
        return raw

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config.json file."""
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        """Write a config.json file."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-initialisable config of the same architecture as SmolLM2,
    for fast unit tests (grouped-query attention, tied embeddings)."""
    values: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return ModelConfig(**values)


def llama2_7b_config() -> ModelConfig:
    """Llama-2-7B's shapes (untied embeddings), used to check the memory model
    against the RAP paper's published figures without any weights."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def llama3_8b_config() -> ModelConfig:
    """Llama-3-8B's shapes (grouped-query attention, 8 KV heads, untied
    embeddings), used to check the memory model's precision levels by hand."""
    return ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
