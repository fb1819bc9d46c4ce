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

Specs, manifests and blobs come from files and from Redis, which anyone with
the password can write, so they are parsed defensively: JSON is bounded in
size before it is parsed, a spec's declared sizes are bounded (`MAX_*`)
before anything is sized by them, and every failure is an
`AdapterFormatError` (a ValueError) whose message is bounded too: it echoes
at most a prefix of whatever it quotes.

This module knows names, sizes and specs, never tensors, and imports no
torch: the operator reads manifests through it. The tensors themselves
(`AdapterWeights`, a part's bytes) are in `weights`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from elasticfleet.worker.adapters.names import (
    ALL_MODULES,
    ATTENTION_MODULES,
    FFN_MODULES,
    MAX_LAYERS,
    MAX_RANK,
    MAX_TASKS,
    MAX_TEXT,
    is_valid_name,
)
from elasticfleet.worker.model.plan import PruningPlan

SPEC_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"

MAX_SPEC_BYTES = 64 << 10  # adapter.json
# A manifest of MAX_LAYERS layers x (MAX_TASKS + 2) parts of every block,
# with long task names, is about 6 MB.
MAX_MANIFEST_BYTES = 8 << 20

TENSOR_PATTERN = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(A|router|B\.(.+))$")


class AdapterFormatError(ValueError):
    """An adapter spec, directory, manifest or blob is malformed or beyond
    the format's bounds. The message says what and where, in bounded length."""


def shown(value: object, limit: int = 64) -> str:
    """`value`'s repr, cut to `limit` characters of it: messages quote what
    callers sent, and a 10,000-character name must not make a 10 kB error."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clipped(error: object, limit: int = 200) -> str:
    """An error's text in at most `limit` characters (parsers quote their input)."""
    text = str(error)
    return text if len(text) <= limit else f"{text[:limit]}..."


def check_name(kind: str, name: object) -> str:
    """`name` if it is a valid adapter or task name, else an AdapterFormatError saying why."""
    if not is_valid_name(name):
        raise AdapterFormatError(
            f"{kind} name {shown(name)} is invalid: use 1-63 lowercase letters, digits, '-' or "
            "'_', starting and ending with a letter or digit"
        )
    return name


def module_block(layer: int, module: str) -> int:
    """The pruning block that holds projection `module` of `layer`."""
    if module in ATTENTION_MODULES:
        return 2 * layer
    if module in FFN_MODULES:
        return 2 * layer + 1
    raise AdapterFormatError(
        f"unknown module {shown(module)}; expected one of {', '.join(ALL_MODULES)}"
    )


def parse_json(text: str | bytes, *, max_bytes: int, what: str) -> dict[str, Any]:
    """A JSON object from `text`, refused before parsing when longer than
    `max_bytes`. Nesting is bounded twice: the parser stops at Python's
    recursion limit (caught here), and callers accept only the few levels
    their schema has. NaN and Infinity are not JSON and are refused."""
    if len(text) > max_bytes:
        raise AdapterFormatError(
            f"{what} is {len(text):,} bytes, more than the {max_bytes:,} allowed"
        )
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise AdapterFormatError(f"{what} is nested too deeply to be one") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise AdapterFormatError(f"{what} is not valid JSON: {clipped(error)}") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{what} is a JSON {type(raw).__name__}, not an object")
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _field(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """raw[key], which must be of `kind` (bool is not an int here)."""
    if key not in raw:
        raise AdapterFormatError(f"adapter spec lacks the field {key!r}")
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise AdapterFormatError(
            f"adapter spec field {key!r} must be {names}, got {type(value).__name__} {shown(value)}"
        )
    return value


def _names(raw: Mapping[str, Any], key: str, limit: int) -> tuple[str, ...]:
    """raw[key], a list of at most `limit` strings."""
    values = _field(raw, key, list)
    if len(values) > limit:
        raise AdapterFormatError(f"adapter spec lists {len(values):,} {key}, at most {limit}")
    for value in values:
        if not isinstance(value, str):
            raise AdapterFormatError(f"adapter spec {key} must be strings, got {shown(value)}")
    return tuple(values)


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
        """Validate, sizes first: they bound everything sized from the spec."""
        if not 0 < self.num_layers <= MAX_LAYERS or not 0 < self.rank <= MAX_RANK:
            raise AdapterFormatError(
                f"num_layers must be 1-{MAX_LAYERS} and rank 1-{MAX_RANK}, got "
                f"{shown(self.num_layers)} and {shown(self.rank)}"
            )
        if not 0 < len(self.tasks) <= MAX_TASKS:
            raise AdapterFormatError(
                f"an adapter set needs 1-{MAX_TASKS} tasks, got {len(self.tasks):,}"
            )
        if not 0 < len(self.modules) <= len(ALL_MODULES):
            raise AdapterFormatError(
                f"an adapter set needs 1-{len(ALL_MODULES)} modules, got {len(self.modules):,}"
            )
        check_name("adapter", self.name)
        for task in self.tasks:
            check_name("task", task)
        if len(set(self.tasks)) != len(self.tasks):
            raise AdapterFormatError(f"task names repeat: {', '.join(self.tasks)}")
        for module in self.modules:
            module_block(0, module)
        if len(set(self.modules)) != len(self.modules):
            raise AdapterFormatError(f"module names repeat: {', '.join(self.modules)}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise AdapterFormatError(f"alpha must be positive and finite, got {self.alpha}")
        if len(self.base_model) > MAX_TEXT:
            raise AdapterFormatError(
                f"base_model is {len(self.base_model):,} characters, at most {MAX_TEXT}"
            )

    @property
    def scaling(self) -> float:
        """LoRA's alpha / rank."""
        return self.alpha / self.rank

    def task_index(self, task: str) -> int:
        """Index of `task`'s B head; ValueError naming the known tasks otherwise."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise AdapterFormatError(
                f"adapter {self.name!r} has no task {shown(task)}; its tasks are "
                f"{', '.join(self.tasks)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["modules"] = list(self.modules)
        raw["tasks"] = list(self.tasks)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AdapterSpec:
        """A spec from parsed JSON, each field of its JSON type (no coercion:
        a string where a number belongs is an error, not a conversion)."""
        return cls(
            name=_field(raw, "name", str),
            base_model=_field(raw, "base_model", str),
            num_layers=_field(raw, "num_layers", int),
            rank=_field(raw, "rank", int),
            alpha=float(_field(raw, "alpha", (int, float))),
            modules=_names(raw, "modules", len(ALL_MODULES)),
            tasks=_names(raw, "tasks", MAX_TASKS),
            router=_field(raw, "router", bool) if "router" in raw else False,
        )

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
        raise AdapterFormatError(f"tensor name {shown(name)} is not an adapter tensor name")
    layer, module, kind, task = match.groups()
    block = module_block(int(layer), module)
    if kind == "A":
        return f"A/{block}"
    if kind == "router":
        return f"router/{block}"
    return f"B/{task}/{block}"


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


def part_tensors(spec: AdapterSpec, part: str) -> set[str]:
    """The names of the tensors part `part` of a complete set holds."""
    kind, _, rest = part.partition("/")
    task, _, block = rest.rpartition("/")
    if not block.isdigit():
        raise AdapterFormatError(f"part name {shown(part)} has no block number")
    layer, kind_of_block = divmod(int(block), 2)
    modules = FFN_MODULES if kind_of_block else ATTENTION_MODULES
    suffix = {"A": "A", "router": "router", "B": f"B.{task}"}.get(kind, "")
    return {f"layers.{layer}.{m}.{suffix}" for m in spec.modules if m in modules}
