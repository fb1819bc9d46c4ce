"""The memory model: predicted bytes for a (config, plan, batch, sequence, dtype).

This is the single function that the agent's policies, the worker's admission
control and the operator use to decide whether a plan fits a budget, so it
has no torch or Kubernetes dependency. It follows RAP's model:

    M = bytes(kept weights) + sum over kept attention blocks of KV bytes(batch x sequence)

Weights that no plan can drop (token embeddings, the final norm and an untied
output head) are always counted. Each attention block owns its projections
and its input RMSNorm; each FFN block owns its three projections and its
post-attention RMSNorm.

A block's bytes follow its level (worker/model/plan.py), scales and zero
points included, exactly as worker/model/quant.py stores them; norms stay
at the serving dtype:

- full: out x in elements of the serving dtype per projection;
- int8: out x in int8 plus one scale per output channel (serving dtype);
- int4: out x in / 2 bytes (two 4-bit values a byte) plus a scale and a
  zero point per group of `int4_group_size(in)` inputs of each output
  channel (serving dtype);
- a KV cache at int8: per token and layer, keys and values in int8 plus one
  scale per KV head for each (serving dtype).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan

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


#: The serving dtypes a worker takes (`--dtype`, the CRD's spec.model.dtype),
#: by their short names, and the dtype names the memory model counts them by.
SERVING_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


def projection_shapes(config: ModelConfig, attention: bool) -> list[tuple[int, int]]:
    """(out, in) features of each projection of an attention (q, k, v, o)
    or FFN (gate, up, down) block."""
    hidden = config.hidden_size
    if attention:
        q_out = config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        return [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out)]
    inter = config.intermediate_size
    return [(inter, hidden), (inter, hidden), (hidden, inter)]


#: int4 group sizes, preferred first. 64 is the largest power of two that
#: divides every input width of SmolLM2 (576 = 9 x 64, 1536) and of the
#: Llama-2/3 families; a scale and a zero point per 64 weights cost 0.5 bit
#: a weight in 16-bit dtypes. Widths 64 does not divide fall back to 32 (the
#: tiny test model's FFN, 160 wide). torch's CPU int4 kernel takes both.
INT4_GROUP_SIZES = (64, 32)


def int4_group_size(in_features: int) -> int:
    """The group size of an int4 projection with `in_features` inputs."""
    for size in INT4_GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise ValueError(
        f"int4 needs an input width divisible by one of {INT4_GROUP_SIZES}, got {in_features}"
    )


def projection_bytes(out_features: int, in_features: int, level: str, dtype: object) -> int:
    """Bytes one projection holds at `level` (scales and zero points included)."""
    per = dtype_bytes(dtype)
    weights = out_features * in_features
    if level == FULL:
        return weights * per
    if level == INT8:
        return weights + out_features * per
    if level == INT4:
        groups = in_features // int4_group_size(in_features)
        return weights // 2 + groups * out_features * 2 * per
    raise ValueError(f"no weight bytes for level {level!r}")


@functools.lru_cache(maxsize=1024)
def block_bytes_at(config: ModelConfig, block: int, level: str, dtype: object) -> int:
    """Bytes block `block` holds at `level` (0 when dropped): its projections
    at that level and its norm at the serving dtype. (Cached: policies ask
    for the same few figures thousands of times a decision.)"""
    if level == DROPPED:
        return 0
    shapes = projection_shapes(config, attention=block % 2 == 0)
    norm = config.hidden_size * dtype_bytes(dtype)
    return norm + sum(projection_bytes(o, i, level, dtype) for o, i in shapes)


def fixed_params(config: ModelConfig) -> int:
    """Parameters no plan can drop: embeddings, final norm, and an untied output head."""
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embeddings
    return embeddings + head + config.hidden_size


def kv_bytes_per_token(config: ModelConfig, dtype: object, level: str = FULL) -> int:
    """KV bytes one token costs in one kept attention block (keys and values)
    with the cache at `level`: int8 values plus a scale per head for each."""
    heads = config.num_key_value_heads
    if level == INT8:
        return 2 * heads * config.head_dim + 2 * heads * dtype_bytes(dtype)
    if level != FULL:
        raise ValueError(f"no KV bytes for level {level!r}")
    return 2 * heads * config.head_dim * dtype_bytes(dtype)


# Tokens per block of the paged KV cache (worker/model/kvcache.py). Smaller
# blocks waste less of a sequence's last block; larger ones mean fewer table
# entries to gather. vLLM's default is 16 too. Here, not in kvcache.py, so
# the operator (no torch) plans in the same blocks the workers allocate.
BLOCK_TOKENS = 16


def blocks_for(tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_tokens)


def pooled_positions(batch: int, seq_len: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Positions a worker's paged pool holds to run `batch` sequences of
    `seq_len` tokens: each sequence's whole blocks, plus the one scratch
    block every pool keeps (worker/serving/admission.py)."""
    return (batch * blocks_for(seq_len, block_tokens) + 1) * block_tokens


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
    """Bytes of kept weights (each block at its level) plus the KV cache of
    kept attention blocks (each at its KV level) for `batch` sequences of
    `seq_len` tokens each (prompt plus generated)."""
    if batch < 0 or seq_len < 0:
        raise ValueError(f"batch and seq_len must be non-negative, got {batch} and {seq_len}")
    plan = plan or PruningPlan.dense(config.num_hidden_layers)
    plan.check_layers(config.num_hidden_layers)
    weights = fixed_params(config) * dtype_bytes(dtype) + sum(
        block_bytes_at(config, block, level, dtype) for block, level in enumerate(plan.levels())
    )
    per_token = sum(
        kv_bytes_per_token(config, dtype, plan.kv_level(layer))
        for layer, keep in enumerate(plan.keep_attention)
        if keep
    )
    return MemoryEstimate(weight_bytes=weights, kv_bytes=per_token * batch * seq_len)


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
