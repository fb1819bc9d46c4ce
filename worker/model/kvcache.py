"""A paged KV cache: fixed-size blocks of token positions in one pool per
kept attention block, and a block table per sequence.

Why paged: a rectangular cache (rows x the longest row) makes every row as
long as the longest request, so one long request multiplies the memory of
every short one. Here a sequence holds only the blocks its tokens fill
(plus what the caller assigns ahead of them), wherever they are in the pool.

Layout. Each kept attention layer owns two pool tensors, keys and values,
of shape [blocks * block_tokens, kv_heads, head_dim]: token-major, so a
token's keys are one contiguous run and writing a step's tokens is one
indexed store. Block b holds slots b*block_tokens .. (b+1)*block_tokens-1 in
every layer, so one block table serves all layers. Row r's position p lives
at slot table[r, p // block_tokens] * block_tokens + p % block_tokens.

Block 0 is scratch: table entries no block was assigned to point at it. A
right-padded forward writes its padding positions there (and a read of a
padded position lands there; the attention mask hides it), so padding never
needs blocks of its own. The pool is zero-filled when allocated, so nothing
read through a mask is ever NaN (a NaN would survive the mask's -inf).

The interface the model uses is small, and is the same as the rectangular
cache it replaced: `lengths` (tokens held per row, advanced by the forward),
`capacity` (the positions a row may reach), `history_start` and
`update(layer, key, value, positions, kv_len)`, which stores a step's keys
and values and returns the first kv_len positions of every row, gathered
through the block table into [rows, kv_heads, kv_len, head_dim]. Storage
lives behind `_store` and `_gather`, the two places a quantized storage
level plugs in (`_gather` may dequantize into its workspace).

Whoever owns the cache (the serving engine, local generation) assigns
blocks before a forward (`assign`), frees a row's blocks when its sequence
leaves (`clear_row`), reorders rows (`arrange`) so that the rows of one
forward are consecutive (`rows` returns a view sharing the pool), and sets
the pool's size (`reserve`). A pool shrinks by compaction: used blocks above
the new size move into free ones below it, so no sequence loses a token.

A dropped attention block's pool is freed at once (`sync_layers`). A block
restored while sequences run has no keys or values for the tokens they
hold: its history starts at each row's current length (`history_start`),
and it attends only to tokens from there on.

Int8 KV (a plan's KV level per attention block). An int8 layer's pools hold
int8 codes, and two more, `key_scales` and `value_scales`, hold each
token's scale per head ([slots, kv_heads], in the cache's dtype):
symmetric, scale = max |x| over the head's dimensions / 127, so one outlier
token or head costs only its own precision. `_store` quantizes, `_gather`
dequantizes into the same workspace as a full layer's gather. The bytes are
what `kv_bytes_per_token` counts for INT8. A layer whose level changes while
sequences run keeps their tokens: its pools are converted in place
(quantized, or dequantized, which gives back the quantized values), so a
running sequence goes on attending to its whole history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.memory import BLOCK_TOKENS, blocks_for, kv_bytes_per_token
from elasticfleet.worker.model.plan import FULL, INT8

SCRATCH_BLOCK = 0


class KVCache:
    """Paged keys and values for `batch_size` sequence rows."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        layers: Iterable[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_tokens: int = BLOCK_TOKENS,
        int8_layers: Iterable[int] = (),
    ) -> None:
        """`int8_layers` (of `layers`) store their KV at int8.

        With capacity > 0 every row gets blocks for `capacity` positions
        now (local generation: the layout of a rectangular cache, paged) and
        may not grow past it; with capacity 0 the pool starts empty and the
        caller assigns blocks as sequences grow, up to the model's context."""
        if batch_size <= 0 or capacity < 0 or block_tokens <= 0:
            raise ValueError(
                "KV cache needs a positive batch size and block size and a capacity of at "
                f"least 0, got {batch_size}, {block_tokens} and {capacity}"
            )
        self.config = config
        self.batch_size = batch_size
        self.block_tokens = block_tokens
        self.dtype = dtype
        self.device = torch.device(device)
        width = blocks_for(config.max_position_embeddings, block_tokens)
        self.capacity = capacity or width * block_tokens
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.table = torch.zeros(batch_size, width, dtype=torch.long, device=self.device)
        self.row_blocks: list[list[int]] = [[] for _ in range(batch_size)]
        self.num_blocks = 0  # pool size, scratch block included
        self.free: list[int] = []
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Int8 layers only: a scale per slot and head, [slots, kv_heads].
        self.key_scales: dict[int, torch.Tensor] = {}
        self.value_scales: dict[int, torch.Tensor] = {}
        self.history_start: dict[int, torch.Tensor] = {}
        self._slots_for: torch.Tensor | None = None  # the positions `_slots` was computed for
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        # Gather targets reused by every layer and forward (see `_gather`).
        self._workspace: dict[str, torch.Tensor] = {}
        int8 = set(int8_layers)
        for layer in layers:
            self._allocate(layer, INT8 if layer in int8 else FULL)
        if capacity:
            self.reserve(1 + batch_size * blocks_for(capacity, block_tokens))
            for row in range(batch_size):
                self.assign(row, capacity)

    # -- storage ------------------------------------------------------------

    def _allocate(self, layer: int, level: str) -> None:
        slots, heads = self.num_blocks * self.block_tokens, self.config.num_key_value_heads
        shape = (slots, heads, self.config.head_dim)
        dtype = torch.int8 if level == INT8 else self.dtype
        self.keys[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
        if level == INT8:
            for scales in (self.key_scales, self.value_scales):
                scales[layer] = torch.zeros((slots, heads), dtype=self.dtype, device=self.device)

    def _stores(self) -> tuple[dict[int, torch.Tensor], ...]:
        """Every per-slot pool: codes (or values) and the int8 layers' scales."""
        return (self.keys, self.values, self.key_scales, self.value_scales)

    def level(self, layer: int) -> str:
        """The KV level layer `layer` stores at (it must be kept)."""
        return INT8 if layer in self.key_scales else FULL

    def _store(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Write keys and values [B, T, Hkv, D] at slots [B, T]."""
        if layer in self.key_scales:
            for store, scales, x in (
                (self.keys, self.key_scales, key),
                (self.values, self.value_scales, value),
            ):
                store[layer][slots], scales[layer][slots] = quantize_int8(x)
        else:
            self.keys[layer][slots] = key
            self.values[layer][slots] = value

    def _gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at the head-major row index of `_slot_maps`, as
        contiguous [B, Hkv, K, D] tensors.

        They are gathered into two workspace buffers that every layer and
        every forward reuses (a layer's attention is done with them before
        the next layer gathers): a fresh 6 MB tensor per layer and step at
        32 rows cost ~10 ms each in page faults here, 15x the attention
        itself. The workspace is scratch like any activation, not KV
        storage, and lives as long as the cache."""
        head_dim = self.config.head_dim
        count = index.numel()
        gathered = []
        for name, store, scales in (
            ("keys", self.keys, self.key_scales),
            ("values", self.values, self.value_scales),
        ):
            pool = store[layer].view(-1, head_dim)
            out = self._buffer(name, count * head_dim, self.dtype).view(count, head_dim)
            if layer not in scales:
                gathered.append(torch.index_select(pool, 0, index, out=out))
                continue
            codes = self._buffer("codes", count * head_dim, torch.int8).view(count, head_dim)
            torch.index_select(pool, 0, index, out=codes)
            scale = torch.index_select(scales[layer].view(-1), 0, index)
            gathered.append(torch.mul(codes, scale[:, None], out=out))
        shape = (self.batch_size, self.config.num_key_value_heads, -1, head_dim)
        return gathered[0].view(shape), gathered[1].view(shape)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Workspace `name` of at least `numel` elements (see `_gather`)."""
        buffer = self._workspace.get(name)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor, writable in and out of it
                buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._workspace[name] = buffer
        return buffer[:numel]

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def sync_layers(self, keep_attention: Sequence[bool], kv_levels: Sequence[str] = ()) -> None:
        """Free the pools of dropped attention blocks, allocate restored ones
        and convert kept ones whose KV level (`kv_levels`, full where not
        given) changed, keeping their tokens.

        A restored block's history begins at each row's current length."""
        for layer, keep in enumerate(keep_attention):
            level = kv_levels[layer] if kv_levels else FULL
            if not keep and layer in self.keys:
                for store in self._stores():
                    store.pop(layer, None)
                self.history_start.pop(layer, None)
            elif keep and layer not in self.keys:
                self._allocate(layer, level)
                if bool(self.lengths.any()):
                    self.history_start[layer] = self.lengths.clone()
            elif keep and level != self.level(layer):
                self._convert(layer, level)

    def _convert(self, layer: int, level: str) -> None:
        """Re-store a kept layer's pools at `level`, every slot at once: a
        layer at a time, so memory exceeds the larger level's by about one
        pool of the layer in float32 while the layer changes."""
        for store, scales in ((self.keys, self.key_scales), (self.values, self.value_scales)):
            if level == INT8:
                store[layer], scales[layer] = quantize_int8(store[layer])
            else:
                store[layer] = store[layer].to(self.dtype) * scales.pop(layer)[..., None]

    # -- the model's side ---------------------------------------------------

    def _slot_maps(self, positions: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(write slots [B, T] of `positions`, the read index: pool rows of
        the first kv_len positions, head-major [B * Hkv * kv_len] over the
        pool viewed as [slots * Hkv, D]), computed once per forward: every
        layer of it passes the same positions tensor, and holding it keeps
        its identity unique."""
        if self._slots_for is not positions or self._slots is None:
            tokens = self.block_tokens
            write = self.table.gather(1, positions // tokens) * tokens + positions % tokens
            span = blocks_for(kv_len, tokens)
            offsets = torch.arange(tokens, device=self.device)
            read = (self.table[:, :span, None] * tokens + offsets).reshape(self.batch_size, -1)
            heads = self.config.num_key_value_heads
            head = torch.arange(heads, device=self.device)[None, :, None]
            index = (read[:, None, :kv_len] * heads + head).reshape(-1)  # [B * Hkv * kv_len]
            self._slots_for, self._slots = positions, (write, index)
        return self._slots

    def update(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ([B, Hkv, T, D]) at `positions` ([B, T])
        and return every row's first kv_len positions, [B, Hkv, kv_len, D]."""
        write, index = self._slot_maps(positions, kv_len)
        self._store(layer, write, key.transpose(1, 2), value.transpose(1, 2))
        return self._gather(layer, index)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) that shares this one's pools,
        table and lengths: writes through the view land here. Only a
        forward runs on a view; blocks are assigned on the cache itself."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop} are outside 0..{self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = stop - start
        view.lengths = self.lengths[start:stop]
        view.table = self.table[start:stop]
        view.row_blocks = self.row_blocks[start:stop]
        view.history_start = {layer: t[start:stop] for layer, t in self.history_start.items()}
        view._slots_for = view._slots = None
        return view

    # -- blocks -------------------------------------------------------------

    @property
    def blocks_in_use(self) -> int:
        """Blocks assigned to rows (the scratch block is not counted)."""
        return sum(len(blocks) for blocks in self.row_blocks)

    def assign(self, row: int, tokens: int) -> None:
        """Give `row` blocks for its first `tokens` positions (it keeps those
        it has). Raises ValueError when the pool has too few free blocks:
        the caller grows the pool (`reserve`) first."""
        if tokens > self.capacity:
            raise ValueError(f"a row may hold {self.capacity} positions, {tokens} asked")
        blocks = self.row_blocks[row]
        missing = blocks_for(tokens, self.block_tokens) - len(blocks)
        if missing <= 0:
            return
        if missing > len(self.free):
            raise ValueError(f"{missing} blocks needed, {len(self.free)} free")
        new = [self.free.pop() for _ in range(missing)]
        self.table[row, len(blocks) : len(blocks) + missing] = torch.tensor(new)
        blocks.extend(new)

    def clear_row(self, row: int) -> None:
        """Make `row` empty: its blocks go back to the pool, length 0 and a
        full history in every layer."""
        self.free.extend(self.row_blocks[row])
        self.row_blocks[row] = []
        self.table[row] = SCRATCH_BLOCK
        self.lengths[row] = 0
        for start in self.history_start.values():
            start[row] = 0

    def arrange(self, order: Sequence[int]) -> None:
        """Reorder the first len(order) rows: row i becomes what row
        order[i] was (a permutation of them). Only the table and the
        bookkeeping move; no key or value is copied."""
        count = len(order)
        if sorted(order) != list(range(count)):
            raise ValueError(f"{list(order)} is not a permutation of rows 0..{count - 1}")
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.table[:count] = self.table[index]
        self.lengths[:count] = self.lengths[index]
        for start in self.history_start.values():
            start[:count] = start[index]
        self.row_blocks[:count] = [self.row_blocks[i] for i in order]

    def reserve(self, num_blocks: int) -> None:
        """Size the pool to `num_blocks` blocks (the scratch block included),
        keeping every row's tokens. Shrinking moves used blocks above the
        new size into free ones below it first; each layer is reallocated
        in turn, so memory exceeds the larger size by at most one layer."""
        used = self.blocks_in_use
        if num_blocks < used + 1:
            raise ValueError(f"{used} blocks are in use; a pool of {num_blocks} cannot hold them")
        if num_blocks < self.num_blocks:
            self._compact(num_blocks)
        old = self.num_blocks
        if old == num_blocks:
            return
        kept = min(old, num_blocks) * self.block_tokens
        for store in self._stores():
            for layer, pool in store.items():
                new = torch.zeros(
                    (num_blocks * self.block_tokens, *pool.shape[1:]),
                    dtype=pool.dtype,
                    device=self.device,
                )
                new[:kept] = pool[:kept]
                store[layer] = new
                del pool
        held = {block for blocks in self.row_blocks for block in blocks}
        first = max(old, 1)  # block 0 is scratch, never free
        self.free = [b for b in self.free if b < num_blocks]
        self.free += [b for b in range(first, num_blocks) if b not in held]
        self.free.sort(reverse=True)  # low blocks first: a later shrink moves fewer
        self.num_blocks = num_blocks

    def _compact(self, num_blocks: int) -> None:
        """Move every used block at or above `num_blocks` into a free one below it."""
        low_free = sorted(b for b in self.free if b < num_blocks)
        moves: dict[int, int] = {}
        for blocks in self.row_blocks:
            for index, block in enumerate(blocks):
                if block >= num_blocks:
                    moves[block] = blocks[index] = low_free.pop()
        if not moves:
            return
        tokens = self.block_tokens
        offsets = torch.arange(tokens, device=self.device)
        source = (torch.tensor(list(moves))[:, None] * tokens + offsets).reshape(-1)
        target = (torch.tensor(list(moves.values()))[:, None] * tokens + offsets).reshape(-1)
        for store in self._stores():
            for pool in store.values():
                pool[target] = pool[source]
        for row, blocks in enumerate(self.row_blocks):
            if blocks:
                self.table[row, : len(blocks)] = torch.tensor(blocks)
        self.free = [b for b in self.free if b < num_blocks and b not in moves.values()]

    # -- accounting ---------------------------------------------------------

    def reserved_bytes(self) -> int:
        """Bytes of pool storage allocated, whether filled or not."""
        return sum(t.untyped_storage().nbytes() for s in self._stores() for t in s.values())

    def used_bytes(self) -> int:
        """Bytes holding real tokens: each row's length (minus any history a
        restored layer lacks) times the per-token size, summed over layers."""
        total = 0
        for layer in self.keys:
            per_token = kv_bytes_per_token(self.config, self.dtype, self.level(layer))
            start = self.history_start.get(layer)
            filled = self.lengths if start is None else self.lengths - start
            total += int(filled.clamp(min=0).sum()) * per_token
        return total


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales) of `x` [..., D]: symmetric, one scale per vector
    over its last dimension (a token's head), max |x| / 127. An all-zero
    vector (a never-written slot) gets scale 0 and codes 0."""
    wide = x.float()  # codes from the scale as stored, computed in float32
    scale = (wide.abs().amax(dim=-1) / 127).to(x.dtype)
    # A zero scale's vector is all zeros: any positive divisor gives code 0.
    divisor = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    codes = wide / divisor  # one temporary the size of x, rounded in place
    return codes.round_().clamp_(-127, 127).to(torch.int8), scale
