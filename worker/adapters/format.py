"""The AsymLoRA adapter format: what an adapter set is, on disk and in parts.

An adapter set adapts some projections of every layer of one base model. Per
adapted projection it holds one shared A [rank, in], one B head [out, rank]
per task and, when trained for it, a router [tasks, in] that mixes the heads
per token (HydraLoRA). Tensors are named

    layers.{i}.{module}.A
    layers.{i}.{module}.B.{task}
    layers.{i}.{module}.router

On disk a set is a directory with `adapter.json` (the spec) and
`adapter.safetensors` (every tensor). The Redis store and the worker's cache
move it in *parts*, one per pruning block, so a worker fetches only what its
plan and its requests use:

    A/{block}           the shared A matrices of the block's projections
    B/{task}/{block}    one task's B heads for the block
    router/{block}      the block's routers

Block 2i is layer i's attention block (q/k/v/o projections), block 2i+1 its
FFN block (gate/up/down), as in `PruningPlan`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save, save_file

from elasticfleet.worker.model.plan import PruningPlan

SPEC_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + FFN_MODULES

# Names end up in Redis keys and part names; keep them to a safe alphabet.
# (no '.': names are also torch module keys).
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
TENSOR_PATTERN = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(A|router|B\.(.+))$")


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid adapter or task name, else a ValueError saying why."""
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"{kind} name {name!r} is invalid: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return name


def module_block(layer: int, module: str) -> int:
    """The pruning block that holds projection `module` of `layer`."""
    if module in ATTENTION_MODULES:
        return 2 * layer
    if module in FFN_MODULES:
        return 2 * layer + 1
    raise ValueError(f"unknown module {module!r}; expected one of {', '.join(ALL_MODULES)}")


@dataclass(frozen=True)
class AdapterSpec:
    """Everything about an adapter set except its tensors."""

    name: str
    base_model: str
    num_layers: int
    rank: int
    alpha: float
    modules: tuple[str, ...]
    tasks: tuple[str, ...]
    router: bool = False

    def __post_init__(self) -> None:
        check_name("adapter", self.name)
        for task in self.tasks:
            check_name("task", task)
        if not self.tasks:
            raise ValueError("an adapter set needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names repeat: {', '.join(self.tasks)}")
        if not self.modules:
            raise ValueError("an adapter set needs at least one module")
        for module in self.modules:
            module_block(0, module)
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"module names repeat: {', '.join(self.modules)}")
        if self.rank <= 0 or self.num_layers <= 0:
            raise ValueError(
                f"rank and num_layers must be positive, got {self.rank} and {self.num_layers}"
            )
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")

    @property
    def scaling(self) -> float:
        """LoRA's alpha / rank."""
        return self.alpha / self.rank

    def task_index(self, task: str) -> int:
        """Index of `task`'s B head; ValueError naming the known tasks otherwise."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(
                f"adapter {self.name!r} has no task {task!r}; its tasks are {', '.join(self.tasks)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["modules"] = list(self.modules)
        raw["tasks"] = list(self.tasks)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AdapterSpec:
        try:
            return cls(
                name=str(raw["name"]),
                base_model=str(raw["base_model"]),
                num_layers=int(raw["num_layers"]),
                rank=int(raw["rank"]),
                alpha=float(raw["alpha"]),
                modules=tuple(str(m) for m in raw["modules"]),
                tasks=tuple(str(t) for t in raw["tasks"]),
                router=bool(raw.get("router", False)),
            )
        except KeyError as missing:
            raise ValueError(f"adapter spec lacks the field {missing}") from None

    # -- parts ----------------------------------------------------------------

    def blocks(self) -> list[int]:
        """Every block some adapted module lives in, ascending."""
        return sorted(
            {module_block(layer, m) for layer in range(self.num_layers) for m in self.modules}
        )

    def part_names(self) -> list[str]:
        """Every part of a complete set."""
        return self.parts_for(self.blocks(), self.tasks, router=self.router)

    def parts_for(self, blocks: Iterable[int], tasks: Iterable[str], *, router: bool) -> list[str]:
        """The parts a worker needs to serve `tasks` (and the router mixture
        if `router`) on `blocks`. The router mixes every head, so it needs
        all tasks' heads too."""
        wanted = set(blocks) & set(self.blocks())
        if router and not self.router:
            raise ValueError(f"adapter {self.name!r} was not trained with a router")
        task_list = list(self.tasks) if router else list(tasks)
        for task in task_list:
            self.task_index(task)
        names = [f"A/{b}" for b in sorted(wanted)]
        for task in dict.fromkeys(task_list):
            names += [f"B/{task}/{b}" for b in sorted(wanted)]
        if router:
            names += [f"router/{b}" for b in sorted(wanted)]
        return names

    def parts_for_plan(self, plan: PruningPlan, tasks: Iterable[str], *, router: bool) -> list[str]:
        """`parts_for` the blocks `plan` keeps; ValueError if `plan` is for
        another layer count (its blocks would silently match the wrong ones)."""
        plan.check_layers(self.num_layers)
        kept = [b for b, keep in enumerate(plan.to_mask()) if keep]
        return self.parts_for(kept, tasks, router=router)


def tensor_part(name: str) -> str:
    """The part a tensor belongs to (see the module docstring)."""
    match = TENSOR_PATTERN.match(name)
    if match is None:
        raise ValueError(f"tensor name {name!r} is not an adapter tensor name")
    layer, module, kind, task = match.groups()
    block = module_block(int(layer), module)
    if kind == "A":
        return f"A/{block}"
    if kind == "router":
        return f"router/{block}"
    return f"B/{task}/{block}"


@dataclass
class AdapterWeights:
    """An adapter set (or the parts of it a worker holds): spec plus tensors."""

    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]

    def check(self, *, complete: bool) -> None:
        """Shapes are validated by the layer; this checks the names: every
        tensor belongs to the spec, and with `complete` every one is there."""
        expected = expected_tensors(self.spec)
        unknown = sorted(set(self.tensors) - expected)
        if unknown:
            raise ValueError(
                f"adapter {self.spec.name!r} holds tensors its spec does not name: "
                f"{', '.join(unknown[:5])}"
            )
        missing = sorted(expected - set(self.tensors))
        if complete and missing:
            raise ValueError(
                f"adapter {self.spec.name!r} lacks {len(missing)} tensors, e.g. "
                f"{', '.join(missing[:5])}"
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
        """Read a set written by `save`, with errors that name the file."""
        path = Path(directory)
        for file in (SPEC_FILE, TENSORS_FILE):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file} is missing: not an adapter directory")
        try:
            spec = AdapterSpec.from_dict(json.loads((path / SPEC_FILE).read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path / SPEC_FILE} is not a valid adapter spec: {error}") from None
        weights = cls(spec, load_file(str(path / TENSORS_FILE)))
        weights.check(complete=True)
        return weights


def expected_tensors(spec: AdapterSpec) -> set[str]:
    """Every tensor name of a complete set."""
    names: set[str] = set()
    for layer in range(spec.num_layers):
        for module in spec.modules:
            prefix = f"layers.{layer}.{module}"
            names.add(f"{prefix}.A")
            names.update(f"{prefix}.B.{task}" for task in spec.tasks)
            if spec.router:
                names.add(f"{prefix}.router")
    return names


def encode_part(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """One part as safetensors bytes (what the store keeps per blob)."""
    return save({name: t.detach().contiguous() for name, t in tensors.items()})


def decode_part(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a blob written by `encode_part`."""
    return load(blob)
