"""The elastic Llama: a Llama-architecture decoder whose attention and FFN
blocks can be dropped and restored at runtime.

Parameter names follow Hugging Face's LlamaForCausalLM, so one safetensors
file serves both, and a block's weights can be re-read from that file by
name. Dropping a block removes its module (and so the last reference to its
tensors); restoring reads the exact stored values back, checked against the
block's digest in the directory's manifest (worker/model/integrity.py), so a
file changed on disk after start is refused, never served.

Each kept block stands at a level (worker/model/plan.py): full, or its
projections quantized to int8 or int4 weight-only (worker/model/quant.py),
always from the stored full weights, so a block changes level the way it is
restored: by reading it back from the file.

On CPU a full projection's weight may be repacked into oneDNN's blocked
layout, which can make the small-batch matrix products of decoding
memory-bound rather than kernel-bound; whether it does depends on the CPU.
So by default the model measures, at load time, which kernel is fastest for
each projection shape and level on this machine (worker/model/kernels.py).
The packed layout holds the same values in another order; only the
summation order of the dot products changes, so logits move by about 1e-4.
`packed=False` keeps the plain layout, whose arithmetic is that of
transformers' LlamaForCausalLM; `packed=True` packs every full projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.integrity import (
    ATTENTION_PARTS,
    CONFIG_FILE,
    FFN_PARTS,
    WEIGHTS_FILE,
    CorruptModelError,
    WeightDigests,
    open_model_dir,
    read_groups,
    write_manifest,
)
from elasticfleet.worker.model.kernels import (
    PACKED,
    fixed_kernels,
    measure_kernels,
)
from elasticfleet.worker.model.kvcache import KVCache
from elasticfleet.worker.model.memory import projection_shapes
from elasticfleet.worker.model.plan import DROPPED, FULL, INT8, PruningPlan
from elasticfleet.worker.model.quant import QuantLinear


class ProjectionAdapters(Protocol):
    """Per-row additions to the projections of one forward pass (an
    `elasticfleet.worker.adapters.layer.AdapterBatch`). The model knows
    adapters only through this, so the model layer never imports adapters."""

    def apply(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out`, the base projection `module` of `layer` applied to x, plus
        each row's delta."""
        ...


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as Llama does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class ForwardContext:
    """Everything the attention blocks of one forward pass share."""

    positions: torch.Tensor  # [B, T] absolute position of each input token
    cos: torch.Tensor  # [B, 1, T, D]
    sin: torch.Tensor  # [B, 1, T, D]
    cache: KVCache | None
    kv_len: int = 0
    adapters: ProjectionAdapters | None = None
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def project(self, linear: nn.Module, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        """linear(x) plus each row's adapter delta for projection `name` of `layer`."""
        out: torch.Tensor = linear(x)
        if self.adapters is None:
            return out
        return self.adapters.apply(layer, name, x, out)

    def mask(self, layer: int) -> torch.Tensor:
        """Boolean [B, 1, T, kv_len] mask: a query sees keys at or before its
        position, and a restored layer sees only keys it holds."""
        assert self.cache is not None
        start = self.cache.history_start.get(layer)
        key = -1 if start is None else layer
        if key not in self._masks:
            key_pos = torch.arange(self.kv_len, device=self.positions.device)
            mask = key_pos[None, None, :] <= self.positions[:, :, None]  # [B, T, K]
            if start is not None:
                mask = mask & (key_pos[None, None, :] >= start[:, None, None])
            self._masks[key] = mask[:, None]
        return self._masks[key]


class Linear(nn.Linear):
    """A bias-free projection whose weight may be held in oneDNN's packed layout."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, None, "none", [], ""
            )
            return out
        return F.linear(x, self.weight)

    def pack(self) -> None:
        """Replace the weight by its oneDNN-packed copy (the plain one is freed)."""
        if not self.weight.is_mkldnn:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
            self.weight = nn.Parameter(packed, requires_grad=False)


def _block_parts(block: int) -> tuple[str, str]:
    """The decoder-layer attributes of block `block` (2i: attention, 2i+1: FFN)."""
    return ATTENTION_PARTS if block % 2 == 0 else FFN_PARTS


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in the plain strided layout (unpacks oneDNN weights)."""
    return tensor.to_dense() if tensor.is_mkldnn else tensor


class Attention(nn.Module):
    """Grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        self.q_proj = Linear(config.hidden_size, q_out)
        self.k_proj = Linear(config.hidden_size, kv_out)
        self.v_proj = Linear(config.hidden_size, kv_out)
        self.o_proj = Linear(q_out, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = ctx.project(self.q_proj, x, layer, "q_proj")
        k = ctx.project(self.k_proj, x, layer, "k_proj")
        v = ctx.project(self.v_proj, x, layer, "v_proj")
        q = q.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin  # [B, H, T, D]
        k = k * ctx.cos + rotate_half(k) * ctx.sin  # [B, Hkv, T, D]
        if ctx.cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = ctx.cache.update(layer, k, v, ctx.positions, ctx.kv_len)  # [B, Hkv, K, D]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.mask(layer), enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim)
        return ctx.project(self.o_proj, out, layer, "o_proj")  # [B, T, hidden]


class FeedForward(nn.Module):
    """SwiGLU feed-forward network."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        gate = ctx.project(self.gate_proj, x, layer, "gate_proj")
        up = ctx.project(self.up_proj, x, layer, "up_proj")
        return ctx.project(self.down_proj, F.silu(gate) * up, layer, "down_proj")


class DecoderLayer(nn.Module):
    """One layer = an attention block and an FFN block, each optional.

    A dropped block's modules are None, so the layer holds no tensor of it."""

    def __init__(self, config: ModelConfig, keep_attention: bool, keep_ffn: bool) -> None:
        super().__init__()
        self.input_layernorm: RMSNorm | None = None
        self.self_attn: Attention | None = None
        self.post_attention_layernorm: RMSNorm | None = None
        self.mlp: FeedForward | None = None
        if keep_attention:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = Attention(config)
        if keep_ffn:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = FeedForward(config)

    def forward(self, h: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        if self.self_attn is not None and self.input_layernorm is not None:
            h = h + self.self_attn(self.input_layernorm(h), ctx, layer)
        if self.mlp is not None and self.post_attention_layernorm is not None:
            h = h + self.mlp(self.post_attention_layernorm(h), ctx, layer)
        return h


class LlamaBody(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, plan: PruningPlan) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, attn, ffn)
            for attn, ffn in zip(plan.keep_attention, plan.keep_ffn, strict=True)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class ElasticLlama(nn.Module):
    """A Llama causal LM whose blocks follow a PruningPlan that can change at runtime."""

    inv_freq: torch.Tensor  # [D/2] rotary frequencies, a non-persistent buffer

    def __init__(self, config: ModelConfig, plan: PruningPlan | None = None) -> None:
        super().__init__()
        plan = plan or PruningPlan.dense(config.num_hidden_layers)
        plan.check_layers(config.num_hidden_layers)
        self.config = config
        self.plan = plan
        self.weights_path: Path | None = None
        self.digests: WeightDigests | None = None  # what each group read must hash to
        self.model = LlamaBody(config, plan)
        self.lm_head: Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.dtype = torch.float32
        self.kernels = fixed_kernels(torch.float32, torch.device("cpu"), packed=False)
        # Built on the CPU explicitly so that it is real even when the
        # modules are created on the meta device before loading.
        exponent = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (config.rope_theta ** (exponent / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.requires_grad_(False)

    # -- loading and saving -------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        plan: PruningPlan | None = None,
        dtype: torch.dtype = torch.float32,
        packed: bool | None = None,
    ) -> ElasticLlama:
        """Load config.json and model.safetensors from a verified model
        directory (one with its manifest.json), reading only the blocks the
        plan keeps. Every file the manifest lists is checked first (the
        config and tokenizer files by sha256) and each block read by its
        digest, so a corrupt or unprepared directory raises
        CorruptModelError naming the file, never loads. `packed` None (the
        default) measures which kernel each projection shape runs fastest
        on this machine; True or False packs every full projection for
        oneDNN, or none."""
        path = Path(path)
        manifest = open_model_dir(path)
        config = ModelConfig.load(path / CONFIG_FILE)
        plan = plan or PruningPlan.dense(config.num_hidden_layers)
        mask = plan.to_mask()
        with torch.device("meta"):
            model = cls(config, PruningPlan.from_mask(mask))
        model.weights_path = path / WEIGHTS_FILE
        model.digests = WeightDigests.from_manifest(manifest, model.weights_path, config.num_blocks)
        model.dtype = dtype
        device = torch.device("cpu")
        if packed is None:
            shapes = projection_shapes(config, True) + projection_shapes(config, False)
            model.kernels = measure_kernels(shapes, dtype, device)
        else:
            model.kernels = fixed_kernels(dtype, device, packed)
        kept = [block for block, keep in enumerate(mask) if keep]
        model._install(model, "", model._read([None, *kept]))
        model.apply_plan(plan)  # quantizes the blocks the plan holds below full
        return model

    @property
    def packed(self) -> bool:
        """Whether full projections run in oneDNN's packed layout (some do)."""
        return any(
            self.kernels.kernel(FULL, out, inp) == PACKED
            for attention in (True, False)
            for out, inp in projection_shapes(self.config, attention)
        )

    def _read(
        self,
        groups: list[int | None],
        *,
        keep: bool = True,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The verified tensors of `groups` (blocks; None: the shared
        tensors) from the weights file, in `dtype` (default the serving
        dtype); with `keep` False, verify only."""
        if self.weights_path is None or self.digests is None:
            raise ValueError("model has no weights file to load blocks from")
        return read_groups(self.digests, groups, dtype or self.dtype, keep=keep)

    def _install(
        self, module: nn.Module, prefix: str, state: dict[str, torch.Tensor], level: str = FULL
    ) -> None:
        """Assign `state[prefix + name]` to each parameter of `module` in
        place of meta/old tensors, then build each projection at `level`
        with the kernel chosen for it (packing, quantizing); every other
        tensor ends in the serving dtype."""
        names = [name for name, _ in module.named_parameters()]
        missing = [prefix + name for name in names if prefix + name not in state]
        if missing:
            assert self.weights_path is not None  # state came from it
            raise CorruptModelError(
                self.weights_path, f"it has no tensor {missing[0]}: not a model of this config"
            )
        module.load_state_dict({n: state[prefix + n] for n in names}, strict=True, assign=True)
        module.requires_grad_(False)
        for owner in list(module.modules()):
            for name, child in list(owner.named_children()):
                if not isinstance(child, Linear):
                    continue
                kernel = self.kernels.kernel(level, child.out_features, child.in_features)
                if level != FULL:
                    setattr(owner, name, QuantLinear(child.weight, level, self.dtype, kernel))
                elif kernel == PACKED:
                    child.pack()
        if level != FULL:  # the norms were read in float32 to quantize from
            for norm in module.modules():
                if isinstance(norm, RMSNorm):
                    norm.weight = nn.Parameter(norm.weight.to(self.dtype), requires_grad=False)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json, model.safetensors and the manifest.json that
        `from_pretrained` verifies them by (dense models only)."""
        if self.plan.kept_blocks != self.config.num_blocks:
            raise ValueError("only a dense model can be saved; restore all blocks first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / CONFIG_FILE)
        state = {name: dense(t).contiguous() for name, t in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        write_manifest(path, (CONFIG_FILE, WEIGHTS_FILE))

    # -- pruning ------------------------------------------------------------

    def apply_plan(self, plan: PruningPlan) -> None:
        """Drop and restore blocks so the model matches `plan`.

        Validation and all reads (each restored block verified against its
        digest) happen before the first change, so a bad plan, a missing
        weights file or a corrupt block (CorruptWeights, a DataLoss) leaves
        the model exactly as it was. A block that changes level is rebuilt
        from its stored full weights: quantized from them, or, back at
        full, those very values."""
        restore = self._restored_blocks(plan)
        held = self.plan.to_mask()
        drop = [b for b, keep in enumerate(plan.to_mask()) if held[b] and not keep]
        levels = plan.levels()
        restored = [self._read_block(block, levels[block]) for block in restore]
        for block in drop:
            for part in _block_parts(block):
                setattr(self.layer(block // 2), part, None)
        for block, modules in zip(restore, restored, strict=True):
            for part, module in zip(_block_parts(block), modules, strict=True):
                setattr(self.layer(block // 2), part, module)
        self.plan = plan

    def check_restore(self, plan: PruningPlan) -> None:
        """Verify the stored weights of every block `plan` would restore,
        keeping none of them: a caller that drops blocks before it restores
        others (the engine, to bound memory) calls this first, so a corrupt
        block refuses the switch before anything changes."""
        for block in self._restored_blocks(plan):
            self._read([block], keep=False)

    def _restored_blocks(self, plan: PruningPlan) -> list[int]:
        """The blocks `plan` keeps and this model does not hold at the
        plan's level (after checking the plan)."""
        plan.check_layers(self.config.num_hidden_layers)
        held = self.plan.levels()
        restore = [b for b, level in enumerate(plan.levels()) if level not in (DROPPED, held[b])]
        if restore and self.weights_path is None:
            raise ValueError("cannot restore blocks: this model was not loaded from a weights file")
        return restore

    def _read_block(self, block: int, level: str) -> tuple[nn.Module, nn.Module]:
        """Build one block's two modules at `level` from the weights file
        (read in float32 to quantize from)."""
        config = self.config
        parts = _block_parts(block)
        with torch.device("meta"):
            norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            body: nn.Module = Attention(config) if parts == ATTENTION_PARTS else FeedForward(config)
        state = self._read([block], dtype=None if level == FULL else torch.float32)
        for part, module in zip(parts, (norm, body), strict=True):
            self._install(module, f"model.layers.{block // 2}.{part}.", state, level)
        return norm, body

    def layer(self, index: int) -> DecoderLayer:
        """Decoder layer `index`, typed."""
        layer = self.model.layers[index]
        assert isinstance(layer, DecoderLayer)
        return layer

    # -- forward ------------------------------------------------------------

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A KV cache for this model's kept attention blocks."""
        device = self.model.embed_tokens.weight.device
        layers = [i for i, keep in enumerate(self.plan.keep_attention) if keep]
        int8 = [i for i in layers if self.plan.kv_level(i) == INT8]
        return KVCache(
            self.config,
            batch_size,
            capacity,
            layers,
            dtype=self.dtype,
            device=device,
            int8_layers=int8,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        input_lengths: torch.Tensor | None = None,
        last_only: bool = False,
        adapters: ProjectionAdapters | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids [B, T] (right-padded; row b's real tokens are
        the first input_lengths[b]), each row through its own adapter if
        `adapters` routes it to one.

        With a cache, row b's tokens continue at position cache.lengths[b]
        and the cache lengths advance by input_lengths. With last_only, only
        the logits of each row's last real token are computed: [B, 1, V]."""
        batch, steps = input_ids.shape
        if input_lengths is None:
            input_lengths = torch.full((batch,), steps, dtype=torch.long)
        offsets = torch.arange(steps, device=input_ids.device)
        kv_len = 0
        if cache is None:
            positions = offsets[None, :].expand(batch, steps)
        else:
            positions = cache.lengths[:, None] + offsets[None, :]  # [B, T]
            kv_len = int(cache.lengths.max()) + steps
            if kv_len > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} positions, {kv_len} needed")
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {int(positions.max())}, beyond the model's context "
                f"of {self.config.max_position_embeddings}"
            )
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        ctx = ForwardContext(
            positions=positions,
            cos=angles.cos().to(self.dtype),
            sin=angles.sin().to(self.dtype),
            cache=cache,
            kv_len=kv_len,
            adapters=adapters,
        )
        h = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        for index, layer in enumerate(self.model.layers):
            h = layer(h, ctx, index)
        if cache is not None:
            cache.lengths += input_lengths.to(cache.lengths.device)
        if last_only:
            h = h[torch.arange(batch), input_lengths - 1][:, None]  # [B, 1, hidden]
        h = self.model.norm(h)
        if self.lm_head is not None:
            head: torch.Tensor = self.lm_head(h)
            return head  # [B, T, V]
        return self._tied_head(h)

    def _tied_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the tied embedding matrix [V, hidden], which stays in
        the plain layout because token lookups need its rows.

        For a decode batch (2 to 64 rows), MKL's small-M GEMM reads the 113 MB
        matrix at a fraction of memory bandwidth; multiplying 8192-row slices
        by h^T instead is about 2x faster here. Only the packed (fast) mode
        takes that route; the plain mode keeps transformers' arithmetic."""
        weight = self.model.embed_tokens.weight
        batch, steps, hidden = h.shape
        rows = batch * steps
        if not self.packed or not 2 <= rows <= 64:
            return F.linear(h, weight)  # [B, T, V]
        flat = h.reshape(rows, hidden).T  # [hidden, rows]
        logits = torch.cat([part @ flat for part in torch.split(weight, 8192)])  # [V, rows]
        return logits.T.reshape(batch, steps, -1)  # [B, T, V]
