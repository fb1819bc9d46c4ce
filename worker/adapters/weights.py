"""AsymLoRA adapter sets as torch tensors: the tensors of a set, of its
parts as safetensors bytes, and of the parts read back from the store.

Everything else about the format (specs, tensor and part names, bounds,
errors) is in `format`, and the Redis store (`store`) moves parts as bytes,
so neither imports torch: the operator checks AdapterSets against the store
through them, and its image has no torch. This module is where the tensors
are built, for the worker (its cache and layers), the command line's push
and pull, and training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from elasticfleet.worker.adapters.format import (
    MAX_SPEC_BYTES,
    SPEC_FILE,
    TENSORS_FILE,
    AdapterFormatError,
    AdapterSpec,
    clipped,
    expected_tensors,
    parse_json,
    part_tensors,
    shown,
    tensor_part,
)
from elasticfleet.worker.adapters.store import AdapterManifest, AdapterStore, DigestMismatch


@dataclass
class AdapterWeights:
    """An adapter set (or the parts of it a worker holds): spec plus tensors."""

    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]

    def check(self, *, complete: bool) -> None:
        """Every tensor belongs to the spec and is a 2-D float tensor whose
        rank (and for a router, task count) is the spec's; with `complete`
        every one is there. The model's dimensions are checked by the layer
        that loads the set."""
        spec = self.spec
        expected = expected_tensors(spec)
        unknown = sorted(set(self.tensors) - expected)
        if unknown:
            raise AdapterFormatError(
                f"adapter {spec.name!r} holds tensors its spec does not name: "
                f"{', '.join(shown(name) for name in unknown[:5])}"
            )
        missing = sorted(expected - set(self.tensors))
        if complete and missing:
            raise AdapterFormatError(
                f"adapter {spec.name!r} lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}"
            )
        for name, tensor in self.tensors.items():
            kind = name.split(".")[3]  # layers.{i}.{module}.{A|B|router}
            axis, size = {"A": (0, spec.rank), "B": (1, spec.rank)}.get(kind, (0, len(spec.tasks)))
            if tensor.dim() != 2 or tensor.shape[axis] != size or not tensor.is_floating_point():
                raise AdapterFormatError(
                    f"adapter {spec.name!r} tensor {name} is {tensor.dtype} "
                    f"{list(tensor.shape)}: expected a 2-D float tensor with {size} "
                    f"{'rows' if axis == 0 else 'columns'} (rank {spec.rank}, "
                    f"{len(spec.tasks)} tasks)"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def split(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors grouped by part."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.tensors.items():
            parts.setdefault(tensor_part(name), {})[name] = tensor
        return parts

    def encoded_parts(self) -> dict[str, bytes]:
        """A complete set as the store keeps it: each part's safetensors
        bytes, by part (`AdapterStore.publish` takes any object that has
        these and a spec, so the store needs no torch)."""
        self.check(complete=True)
        return {part: encode_part(tensors) for part, tensors in sorted(self.split().items())}

    @classmethod
    def join(cls, spec: AdapterSpec, parts: Iterable[Mapping[str, torch.Tensor]]) -> AdapterWeights:
        """Reassemble (some of) a set from parts."""
        tensors: dict[str, torch.Tensor] = {}
        for part in parts:
            tensors.update(part)
        weights = cls(spec, tensors)
        weights.check(complete=False)
        return weights

    # -- files ----------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write adapter.json and adapter.safetensors into `directory`."""
        self.check(complete=True)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.tensors.items()}
        save_file(tensors, str(path / TENSORS_FILE))
        (path / SPEC_FILE).write_text(json.dumps(self.spec.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> AdapterWeights:
        """Read a set written by `save`; AdapterFormatError naming the file
        if either is malformed (the spec is validated before the tensors
        are read, so its declared sizes bound what follows)."""
        path = Path(directory)
        for file in (SPEC_FILE, TENSORS_FILE):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file} is missing: not an adapter directory")
        try:
            with (path / SPEC_FILE).open("rb") as handle:
                text = handle.read(MAX_SPEC_BYTES + 1)  # enough to know it is too long
            spec = AdapterSpec.from_dict(parse_json(text, max_bytes=MAX_SPEC_BYTES, what="it"))
        except AdapterFormatError as error:
            raise AdapterFormatError(f"{path / SPEC_FILE}: {error}") from None
        try:
            weights = cls(spec, load_file(str(path / TENSORS_FILE)))
            weights.check(complete=True)
        except (SafetensorError, AdapterFormatError) as error:
            raise AdapterFormatError(f"{path / TENSORS_FILE}: {clipped(error)}") from None
        return weights


def encode_part(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """One part as safetensors bytes (what the store keeps per blob)."""
    return save({name: t.detach().contiguous() for name, t in tensors.items()})


def decode_part(
    blob: bytes, spec: AdapterSpec | None = None, part: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a blob written by `encode_part`; given the set's
    `spec` and the `part` it should be, checked to be exactly that part's,
    with the spec's ranks. An AdapterFormatError otherwise (not safetensors,
    another part's tensors, missing ones)."""
    try:
        tensors = load(blob)
    except SafetensorError as error:
        what = "the blob" if part is None else f"part {part}"
        raise AdapterFormatError(f"{what} is not safetensors: {clipped(error)}") from None
    if spec is None or part is None:
        return tensors
    AdapterWeights(spec, tensors).check(complete=False)
    expected = part_tensors(spec, part)
    if set(tensors) != expected:
        wrong = sorted(set(tensors) ^ expected)
        raise AdapterFormatError(
            f"part {part} should hold {len(expected)} tensors and holds {len(tensors)}; "
            f"these differ: {', '.join(shown(name) for name in wrong[:5])}"
        )
    return tensors


def read_tensors(
    store: AdapterStore, manifest: AdapterManifest, parts: Iterable[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of `parts` of `manifest`'s version, by part: verified
    blobs (`AdapterStore.read_parts`), each checked to be exactly its part's
    tensors with the spec's ranks; DigestMismatch otherwise (the data is
    unusable)."""
    decoded = {}
    for part, blob in store.read_parts(manifest, parts).items():
        try:
            decoded[part] = decode_part(blob, manifest.spec, part)
        except AdapterFormatError as error:
            raise DigestMismatch(
                f"adapter {manifest.name!r} version {manifest.version} {error}; it was not "
                "used. Publish the adapter again."
            ) from None
    return decoded


def fetch(
    store: AdapterStore, name: str, version: int | None = None, parts: Sequence[str] | None = None
) -> tuple[AdapterManifest, AdapterWeights]:
    """A version (the current one if None) as weights: all parts, or `parts`."""
    manifest = store.manifest(name, version)
    tensors = read_tensors(store, manifest, manifest.parts if parts is None else parts)
    return manifest, AdapterWeights.join(manifest.spec, tensors.values())
