"""Model directories whose every read is verified, when it is read.

A model directory (what `elasticfleet model prepare` or
`ElasticLlama.save_pretrained` writes) carries a `manifest.json` listing
each file's size and sha256 and, for the weights file, one digest per
pruning block plus one for the tensors no plan drops (embeddings, the final
norm, an untied head):

    "model.safetensors": {"size": ..., "sha256": ...,
                          "blocks": [digest of block 0, ..., of block 2L-1],
                          "shared": digest of the other tensors}

Why per block: a worker re-reads a dropped block when a plan restores it,
possibly days after it started, from a file that may have changed on disk
since. Hashing the whole 538 MB file on every restore would cost a
quarter of a second or more; a block is 3.5 MB (attention) or 10.6 MB (FFN)
of SmolLM2, so each restore checks exactly the tensors it reads, in a few
milliseconds, and a mismatch names the file and the block. At load, every
other file the manifest lists is hashed whole (they are small) and the
weights file is checked by size, then group by group as it is read.

A group's digest is the sha256 of its tensors in name order, each as its
name, dtype and shape followed by its raw bytes, so a flipped byte in the
data or in the header entry that describes it is caught.

The block digests were added to manifest format 1 without changing its
number: readers that predate them ignore the extra keys, so caches shared
between versions keep working. `elasticfleet model prepare` adds them to a
cache an earlier version prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from elasticfleet.worker.errors import DataLoss
from elasticfleet.worker.model.cachedir import MANIFEST, read_manifest, sha256_file, verify_files

if TYPE_CHECKING:  # torch loads where tensors are hashed: `model prepare`'s errors need none
    import torch

MANIFEST_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Module attributes of a decoder layer that make up each prunable block.
ATTENTION_PARTS = ("input_layernorm", "self_attn")
FFN_PARTS = ("post_attention_layernorm", "mlp")

REPAIR_HINT = "rebuild it with `elasticfleet model prepare --force` (--cache-dir for another root)"

_BLOCK_TENSOR = re.compile(
    r"^model\.layers\.(\d+)\.(" + "|".join(ATTENTION_PARTS + FFN_PARTS) + r")\."
)
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class ModelPrepareError(RuntimeError):
    """The model cache cannot be prepared or used."""


class CorruptModelError(ModelPrepareError):
    """A model file is missing or does not match the manifest. `path` is the
    bad file and `problem` what is wrong with it, for log lines."""

    def __init__(self, path: Path, problem: str, hint: str = REPAIR_HINT) -> None:
        super().__init__(f"{path}: {problem}; {hint}")
        self.path = path
        self.problem = problem


class CorruptWeights(CorruptModelError, DataLoss):
    """Weights read from the file do not match their digest. Raised before
    any of them is used: at load nothing is loaded, and a plan that would
    restore them is refused with nothing changed (gRPC DATA_LOSS)."""


def block_name(block: int | None) -> str:
    """How messages name a group: 'block 7 (layer 3 FFN)' or 'the shared tensors'."""
    if block is None:
        return "the shared tensors (embeddings, final norm, head)"
    kind = "attention" if block % 2 == 0 else "FFN"
    return f"block {block} (layer {block // 2} {kind})"


def tensor_block(name: str) -> int | None:
    """The pruning block a weights-file tensor belongs to (2i: layer i's
    attention, 2i+1: its FFN), or None for the shared tensors."""
    match = _BLOCK_TENSOR.match(name)
    if match is None:
        return None
    layer, part = match.groups()
    return 2 * int(layer) + (0 if part in ATTENTION_PARTS else 1)


def group_names(names: Iterable[str]) -> dict[int | None, list[str]]:
    """Tensor names grouped by block (None: shared)."""
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(tensor_block(name), []).append(name)
    return groups


def group_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest of one group's tensors (see the module docstring)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def weight_digests(path: Path) -> dict[str, Any]:
    """The manifest's digests of weights file `path`: one per block from 0
    to the highest block in the file, and one of the shared tensors."""
    with safe_open(str(path), framework="pt") as source:
        groups = group_names(source.keys())
        blocks = [b for b in groups if b is not None]
        digests = {
            block: group_digest({name: source.get_tensor(name) for name in groups.get(block, ())})
            for block in [None, *range(max(blocks, default=-1) + 1)]
        }
    return {
        "blocks": [digests[b] for b in range(len(digests) - 1)],
        "shared": digests[None],
    }


def write_manifest(directory: Path, files: Sequence[str], **fields: Any) -> None:
    """Write `directory`'s manifest.json: size and sha256 of each of `files`
    (and the digests of the weights file), plus `fields` at the top level.
    Written to a temporary file and renamed, so a reader never sees half of it."""
    listed: dict[str, Any] = {}
    for name in files:
        path = directory / name
        entry: dict[str, Any] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if name == WEIGHTS_FILE:
            entry |= weight_digests(path)
        listed[name] = entry
    write_json(directory / MANIFEST, {"format_version": MANIFEST_FORMAT, **fields, "files": listed})


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Replace `path` with `document` atomically (a sibling temporary file, then a rename)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        Path(temporary).chmod(0o644)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def has_block_digests(manifest: Mapping[str, Any]) -> bool:
    """Whether a (read) manifest records the weights file's digests."""
    entry = manifest["files"].get(WEIGHTS_FILE)
    return isinstance(entry, dict) and "blocks" in entry and "shared" in entry


@dataclass(frozen=True)
class WeightDigests:
    """What the manifest says each group of the weights file hashes to."""

    path: Path
    blocks: tuple[str, ...]
    shared: str

    @classmethod
    def from_manifest(
        cls, manifest: Mapping[str, Any], path: Path, num_blocks: int
    ) -> WeightDigests:
        """The digests of weights file `path` from its directory's manifest,
        which must hold one per block of a model with `num_blocks` blocks."""
        manifest_path = path.parent / MANIFEST
        if not has_block_digests(manifest):
            raise CorruptModelError(
                manifest_path,
                f"it has no per-block digests of {path.name} (an earlier elasticfleet wrote it)",
                "run `elasticfleet model prepare` (--cache-dir for another root) to add them",
            )
        entry = manifest["files"][path.name]
        blocks, shared = entry["blocks"], entry["shared"]
        if (
            not isinstance(blocks, list)
            or len(blocks) != num_blocks
            or not all(isinstance(d, str) and _HEX_DIGEST.fullmatch(d) for d in [*blocks, shared])
        ):
            raise CorruptModelError(
                manifest_path,
                f"its digests of {path.name} are not {num_blocks} block digests and a shared one",
            )
        return cls(path, tuple(blocks), shared)

    def check(self, block: int | None, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise CorruptWeights unless `tensors`, all of group `block`, hash as recorded."""
        expected = self.shared if block is None else self.blocks[block]
        found = group_digest(tensors)
        if found != expected:
            raise CorruptWeights(
                self.path,
                f"{block_name(block)} has sha256 {found[:16]}..., its digest in "
                f"{MANIFEST} is {expected[:16]}...: the file changed after it was prepared",
                f"nothing was loaded from it; {REPAIR_HINT}, then restart the worker",
            )


def open_model_dir(path: Path) -> dict[str, Any]:
    """The manifest of model directory `path`, after checking every file it
    lists (the small ones by sha256, the weights file by size: its groups are
    checked as they are read). CorruptModelError says what is wrong."""
    if not (path / MANIFEST).is_file():
        raise CorruptModelError(
            path,
            f"not a prepared model directory: there is no {MANIFEST} to verify its files against",
            "use a directory `elasticfleet model prepare` wrote (ROOT/models/NAME under its "
            "--cache-dir) or ElasticLlama.save_pretrained wrote",
        )
    manifest = read_manifest(
        path,
        format_version=MANIFEST_FORMAT,
        files=(CONFIG_FILE, WEIGHTS_FILE),
        corrupt=CorruptModelError,
    )
    verify_files(path, manifest, deep=True, corrupt=CorruptModelError, size_only=(WEIGHTS_FILE,))
    return manifest


def read_groups(
    digests: WeightDigests, groups: Sequence[int | None], dtype: torch.dtype, *, keep: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of `groups` (block indices; None: the shared tensors),
    each group checked against its digest before the next is read, in
    `dtype`. With `keep` False, only check (hashing the mapped file, no copy)
    and return nothing."""
    state: dict[str, torch.Tensor] = {}
    path = digests.path
    try:
        with safe_open(str(path), framework="pt") as source:
            members = group_names(source.keys())
            for group in groups:
                # The file is mapped: copy first, so the bytes hashed are the bytes kept.
                tensors = {
                    name: source.get_tensor(name).clone() if keep else source.get_tensor(name)
                    for name in members.get(group, ())
                }
                digests.check(group, tensors)
                if keep:
                    state |= {name: t.to(dtype) for name, t in tensors.items()}
    except (SafetensorError, OSError) as error:
        what = ", ".join(block_name(g) for g in groups[:3]) + (", ..." if len(groups) > 3 else "")
        raise CorruptWeights(
            path,
            f"unreadable while reading {what} ({error})",
            f"nothing was loaded from it; {REPAIR_HINT}, then restart the worker",
        ) from None
    return state
