"""The memory model: predicted bytes for a (config, plan, batch, sequence, dtype).

This is the single function that the agent's policies, the worker's admission
control and the operator use to decide whether a plan fits a budget, so it
has no torch or Kubernetes dependency. It follows RAP's model:

    M = bytes(kept weights) + sum over kept attention blocks of KV bytes(batch x sequence)

Weights that no plan can drop (token embeddings, the final norm and an untied
output head) are always counted. Each attention block owns its projections
and its input RMSNorm; each FFN block owns its three projections and its
post-attention RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.plan import PruningPlan

_DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
}


def dtype_bytes(dtype: object) -> int:
    """Bytes per element for a dtype given as a name ('float16') or a torch.dtype."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}"
        ) from None


def attention_block_params(config: ModelConfig) -> int:
    """Parameters of one attention block: q, k, v, o projections and its input norm."""
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    hidden = config.hidden_size
    return hidden * q_out + 2 * hidden * kv_out + q_out * hidden + hidden


def ffn_block_params(config: ModelConfig) -> int:
    """Parameters of one SwiGLU FFN block: gate, up, down projections and its norm."""
    return 3 * config.hidden_size * config.intermediate_size + config.hidden_size


def fixed_params(config: ModelConfig) -> int:
    """Parameters no plan can drop: embeddings, final norm, and an untied output head."""
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embeddings
    return embeddings + head + config.hidden_size


def kv_bytes_per_token(config: ModelConfig, dtype: object) -> int:
    """KV bytes one token costs in one kept attention block (keys and values)."""
    return 2 * config.num_key_value_heads * config.head_dim * dtype_bytes(dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes, split the way the accountant reports them."""

    weight_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def predict_memory(
    config: ModelConfig,
    plan: PruningPlan | None,
    batch: int,
    seq_len: int,
    dtype: object = "float32",
) -> MemoryEstimate:
    """Bytes of kept weights plus the KV cache of kept attention blocks for
    `batch` sequences of `seq_len` tokens each (prompt plus generated)."""
    if batch < 0 or seq_len < 0:
        raise ValueError(f"batch and seq_len must be non-negative, got {batch} and {seq_len}")
    plan = plan or PruningPlan.dense(config.num_hidden_layers)
    plan.check_layers(config.num_hidden_layers)
    kept_attention = sum(plan.keep_attention)
    params = (
        fixed_params(config)
        + kept_attention * attention_block_params(config)
        + sum(plan.keep_ffn) * ffn_block_params(config)
    )
    per = dtype_bytes(dtype)
    kv = kept_attention * kv_bytes_per_token(config, dtype) * batch * seq_len
    return MemoryEstimate(weight_bytes=params * per, kv_bytes=kv)


def decode_flops(config: ModelConfig, plan: PruningPlan | None, context: int) -> int:
    """Multiply-add FLOPs (2 per MAC) to decode one token at `context` tokens
    of history: the kept blocks' matmuls, the output head, and attention
    scores and values over the context in each kept attention block."""
    plan = plan or PruningPlan.dense(config.num_hidden_layers)
    plan.check_layers(config.num_hidden_layers)
    attn_matmul = attention_block_params(config) - config.hidden_size
    ffn_matmul = ffn_block_params(config) - config.hidden_size
    head = config.vocab_size * config.hidden_size
    scores = 2 * config.num_attention_heads * config.head_dim * context
    per_attention = attn_matmul + scores
    macs = head + sum(plan.keep_attention) * per_attention + sum(plan.keep_ffn) * ffn_matmul
    return 2 * macs
