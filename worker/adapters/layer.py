"""AsymLoRA layers: one shared A per adapted projection, one B head per task,
and optionally HydraLoRA's per-token router over the heads.

    W x  +  scaling * B_k A x                      (a named task k: AsymLoRA)
    W x  +  scaling * sum_k softmax(R x)_k B_k A x (the router mixture: HydraLoRA)

The base projection is the model's own Linear (frozen, possibly oneDNN
packed); adapters live beside the model, keyed by layer and projection, and
are applied per row through an `AdapterBatch`. That is what lets one batch
hold rows for different tasks, different adapter sets and no adapter at all:
the base runs once over the whole batch, each adapter set's A runs once over
its rows, and each row then gets its own head (or mixture of heads).

An adapter set holds modules only for the blocks it was built for (a worker
builds it for the blocks its plan keeps), so adapters on a dropped block are
neither loaded nor computed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from elasticfleet.worker.adapters.format import AdapterSpec, module_block
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.plan import PruningPlan


def projection_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of projection `module` in this architecture."""
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = {
        "q_proj": (config.hidden_size, q_out),
        "k_proj": (config.hidden_size, kv_out),
        "v_proj": (config.hidden_size, kv_out),
        "o_proj": (q_out, config.hidden_size),
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    if module not in shapes:
        raise ValueError(f"unknown module {module!r}; expected one of {', '.join(shapes)}")
    return shapes[module]


class AsymLoRA(nn.Module):
    """The adapter of one projection: A [rank, in], the task heads stacked
    and transposed as B [tasks, rank, out] (B[k] = B_k^T), and an optional
    router [tasks, in].

    Every row's delta is one product with all heads at once: the row's
    rank-r code z = A x is spread over the heads by its mixing weights (one
    hot for a named task, the router's softmax otherwise) into a [tasks x
    rank] code, and multiplied by B viewed as [tasks * rank, out]. So a batch
    mixing tasks costs the same few operations as a batch on one task, with
    no gather of per-row weights. `loaded` says which heads hold weights: a
    worker may load only the tasks it serves; the others stay zero and are
    never selected."""

    def __init__(
        self, fan_in: int, fan_out: int, rank: int, tasks: Sequence[str], *, router: bool
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.loaded = frozenset(self.tasks)
        self.A = nn.Parameter(torch.empty(rank, fan_in))
        # Kaiming-uniform as nn.Linear initialises its weight; B starts at
        # zero so an untrained adapter is exactly the base model.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(len(self.tasks), rank, fan_out))
        self.router: nn.Parameter | None = None
        if router:
            # Random, not zero: with equal heads and a uniform router every
            # head would get the same gradient forever.
            self.router = nn.Parameter(torch.empty(len(self.tasks), fan_in))
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def head(self, task: str) -> torch.Tensor:
        """B_k [out, rank] of one task (a view)."""
        return self.B[self.tasks.index(task)].T

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        """The router's per-token weights over the heads: [N, T, K] for x [N, T, in]."""
        assert self.router is not None
        return torch.softmax(x @ self.router.T, dim=-1)

    def delta(self, x: torch.Tensor, route: RowRoute) -> torch.Tensor:
        """B A x for x [N, T, in], each row through its head (or the router
        mixture) as `route` says: [N, T, out]."""
        return self._code(x, route) @ self.B.flatten(0, 1)

    def add_delta(
        self, out: torch.Tensor, x: torch.Tensor, route: RowRoute, scaling: float
    ) -> torch.Tensor:
        """out + scaling * delta(x), fused into one matrix product."""
        code = self._code(x, route)  # [N, T, K * rank]
        fused = torch.addmm(
            out.reshape(-1, out.shape[-1]),
            code.reshape(-1, code.shape[-1]),
            self.B.flatten(0, 1),
            alpha=scaling,
        )
        return fused.view(out.shape)

    def _code(self, x: torch.Tensor, route: RowRoute) -> torch.Tensor:
        """Each row's A x spread over the heads by its mixing weights: [N, T, K * rank]."""
        z = x @ self.A.T  # [N, T, rank]
        mix = route.mix  # [N, 1, K]
        if route.routed:
            rows = route.router_rows
            mix = mix.expand(-1, x.shape[1], -1).index_copy(
                0, rows, self.mixture(x.index_select(0, rows))
            )  # [N, T, K]
        return (mix[..., :, None] * z[..., None, :]).flatten(-2)


@dataclass(frozen=True, eq=False)
class RowRoute:
    """How each row of a group mixes the heads: `mix` [N, 1, K] is one-hot
    on a row's task; rows in `router_rows` take the router's weights."""

    mix: torch.Tensor
    router_rows: torch.Tensor

    @functools.cached_property
    def routed(self) -> bool:
        """Whether any row uses the router (asked once per projection)."""
        return bool(self.router_rows.numel())


def module_key(layer: int, module: str) -> str:
    """Key of a projection's adapter in AdapterSet.lora (torch keys cannot hold dots)."""
    return f"{layer}_{module}"


def tensor_prefix(layer: int, module: str) -> str:
    """Prefix of a projection's tensors in the adapter format."""
    return f"layers.{layer}.{module}"


class AdapterSet(nn.Module):
    """The modules of one adapter set for the blocks it was built for."""

    def __init__(self, spec: AdapterSpec, config: ModelConfig) -> None:
        super().__init__()
        if spec.num_layers != config.num_hidden_layers:
            raise ValueError(
                f"adapter {spec.name!r} is for {spec.num_layers} layers, the model has "
                f"{config.num_hidden_layers}"
            )
        self.spec = spec
        self.config = config
        self.lora = nn.ModuleDict()

    @classmethod
    def create(
        cls, spec: AdapterSpec, config: ModelConfig, *, seed: int | None = None
    ) -> AdapterSet:
        """A fresh, trainable set covering every layer (B heads zero)."""
        adapters = cls(spec, config)
        generator_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for layer in range(config.num_hidden_layers):
                for module in spec.modules:
                    fan_in, fan_out = projection_shape(config, module)
                    adapters.lora[module_key(layer, module)] = AsymLoRA(
                        fan_in, fan_out, spec.rank, spec.tasks, router=spec.router
                    )
        finally:
            if seed is not None:
                torch.random.set_rng_state(generator_state)
        return adapters

    @classmethod
    def from_weights(
        cls, weights: AdapterWeights, config: ModelConfig, *, plan: PruningPlan | None = None
    ) -> AdapterSet:
        """Frozen modules from (possibly partial) weights, only for the blocks
        `plan` keeps; heads missing from `weights` are simply not there."""
        adapters = cls(weights.spec, config)
        adapters.add(weights, plan=plan)
        return adapters

    def add(self, weights: AdapterWeights, *, plan: PruningPlan | None = None) -> None:
        """Add modules (or heads) from weights for blocks `plan` keeps.

        Everything is validated before the first change."""
        spec = self.spec
        if weights.spec != spec:
            raise ValueError(f"weights are for adapter spec {weights.spec}, this set is {spec}")
        keep = plan.to_mask() if plan is not None else None
        built: dict[str, AsymLoRA] = {}
        for layer in range(spec.num_layers):
            for module in spec.modules:
                if keep is not None and not keep[module_block(layer, module)]:
                    continue
                lora = self._build(weights, layer, module)
                if lora is not None:
                    built[module_key(layer, module)] = lora
        for key, lora in built.items():
            self.lora[key] = lora
        self.requires_grad_(False)

    def _build(self, weights: AdapterWeights, layer: int, module: str) -> AsymLoRA | None:
        """One projection's module from the tensors present (merged with the
        heads it already holds), shape-checked."""
        prefix = tensor_prefix(layer, module)
        tensors = weights.tensors
        if f"{prefix}.A" not in tensors:
            return None
        fan_in, fan_out = projection_shape(self.config, module)
        spec = self.spec
        old = self.get(layer, module)
        heads = {t: tensors[f"{prefix}.B.{t}"] for t in spec.tasks if f"{prefix}.B.{t}" in tensors}
        expected = {f"{prefix}.A": (spec.rank, fan_in)}
        expected |= {f"{prefix}.B.{t}": (fan_out, spec.rank) for t in heads}
        router = tensors.get(f"{prefix}.router")
        if router is not None:
            expected[f"{prefix}.router"] = (len(spec.tasks), fan_in)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"adapter tensor {name} has shape {list(tensors[name].shape)}, "
                    f"expected {list(shape)}"
                )
        lora = AsymLoRA(fan_in, fan_out, spec.rank, spec.tasks, router=router is not None)
        stacked = torch.zeros(len(spec.tasks), spec.rank, fan_out)
        loaded = set(heads)
        if old is not None:
            stacked.copy_(old.B.data)
            loaded |= old.loaded
        for task, head in heads.items():
            stacked[spec.task_index(task)] = head.T
        # A and the router share the given tensors' storage (the worker's
        # adapter cache holds them); only the stacked heads are a copy.
        lora.A = nn.Parameter(tensors[f"{prefix}.A"].float(), requires_grad=False)
        lora.B = nn.Parameter(stacked, requires_grad=False)
        lora.loaded = frozenset(loaded)
        if router is not None:
            lora.router = nn.Parameter(router.float(), requires_grad=False)
        return lora

    def retain(self, plan: PruningPlan) -> None:
        """Drop the modules of blocks `plan` does not keep."""
        keep = plan.to_mask()
        for key in list(self.lora):
            layer, module = key.split("_", 1)
            if not keep[module_block(int(layer), module)]:
                del self.lora[key]

    def get(self, layer: int, module: str) -> AsymLoRA | None:
        key = module_key(layer, module)
        if key not in self.lora:
            return None
        lora = self.lora[key]
        assert isinstance(lora, AsymLoRA)
        return lora

    def weights(self) -> AdapterWeights:
        """The tensors of this set, in the adapter format."""
        tensors: dict[str, torch.Tensor] = {}
        for key, lora in self.lora.items():
            assert isinstance(lora, AsymLoRA)
            layer, module = key.split("_", 1)
            prefix = tensor_prefix(int(layer), module)
            tensors[f"{prefix}.A"] = lora.A.detach()
            for task in lora.tasks:
                if task in lora.loaded:
                    tensors[f"{prefix}.B.{task}"] = lora.head(task).detach()
            if lora.router is not None:
                tensors[f"{prefix}.router"] = lora.router.detach()
        return AdapterWeights(self.spec, tensors)

    def has_task(self, task: str) -> bool:
        """Whether every module of this set holds `task`'s head."""
        return all(task in lora.loaded for lora in self._modules_typed())

    @property
    def has_router(self) -> bool:
        """Whether every module holds its router and all heads (the mixture needs them)."""
        return all(
            lora.router is not None and len(lora.loaded) == len(self.spec.tasks)
            for lora in self._modules_typed()
        )

    def _modules_typed(self) -> list[AsymLoRA]:
        modules = list(self.lora.values())
        assert all(isinstance(m, AsymLoRA) for m in modules)
        return modules  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


@dataclass(frozen=True)
class AdapterChoice:
    """What one row asks for: an adapter set and a task, or the router
    mixture when task is None."""

    adapter: str
    task: str | None = None


@dataclass(frozen=True)
class _Group:
    adapters: AdapterSet
    rows: torch.Tensor | None  # rows of the batch that use this set; None: all, in order
    route: RowRoute


class AdapterBatch:
    """Per-row adapter routing for one forward pass.

    Validates every row's choice up front, so a bad request fails before any
    compute and names the adapter or task that is wrong. Build it once per
    batch composition: it precomputes the index tensors every projection uses."""

    def __init__(
        self, sets: Mapping[str, AdapterSet], rows: Sequence[AdapterChoice | None]
    ) -> None:
        members: dict[str, list[tuple[int, int]]] = {}
        heads: dict[AdapterChoice, int] = {}
        for index, choice in enumerate(rows):
            if choice is None:
                continue
            if choice.adapter not in sets:
                known = ", ".join(sorted(sets)) or "none"
                raise KeyError(f"adapter {choice.adapter!r} is not loaded (loaded: {known})")
            if choice not in heads:
                heads[choice] = _head(sets[choice.adapter], choice.task)
            members.setdefault(choice.adapter, []).append((index, heads[choice]))
        self.groups: list[_Group] = []
        self._resolved: dict[tuple[int, str], list[tuple[_Group, AsymLoRA, float]]] = {}
        for name, entries in members.items():
            indices = torch.tensor([head for _, head in entries])
            tasks = len(sets[name].spec.tasks)
            mix = torch.zeros(len(entries), 1, tasks)  # router rows stay zero here
            task_rows = (indices >= 0).nonzero().flatten()
            mix[task_rows, 0, indices[task_rows]] = 1.0
            covers_all = len(entries) == len(rows)  # rows are then 0..B-1 in order
            self.groups.append(
                _Group(
                    adapters=sets[name],
                    rows=None if covers_all else _index(row for row, _ in entries),
                    route=RowRoute(mix=mix, router_rows=(indices < 0).nonzero().flatten()),
                )
            )

    @classmethod
    def single(cls, adapters: AdapterSet, rows: int, task: str | None) -> AdapterBatch:
        """Every one of `rows` rows on the same set and task."""
        choice = AdapterChoice(adapters.spec.name, task)
        return cls({adapters.spec.name: adapters}, [choice] * rows)

    def apply(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base projection of x, [B, T, out]) plus each row's delta."""
        key = (layer, module)
        if key not in self._resolved:  # looked up once per batch, not once per step
            self._resolved[key] = [
                (group, lora, group.adapters.spec.scaling)
                for group in self.groups
                if (lora := group.adapters.get(layer, module)) is not None
            ]
        for group, lora, scaling in self._resolved[key]:
            if group.rows is None:
                out = lora.add_delta(out, x, group.route, scaling)
            else:
                delta = lora.delta(x.index_select(0, group.rows), group.route)  # [n, T, out]
                out = out.index_add(0, group.rows, delta, alpha=scaling)
        return out


def _head(adapters: AdapterSet, task: str | None) -> int:
    """The head index a row uses (-1: the router), after checking it can be served."""
    spec = adapters.spec
    if task is None:
        if not spec.router:
            raise ValueError(
                f"adapter {spec.name!r} has no router; name one of its tasks: "
                f"{', '.join(spec.tasks)}"
            )
        if not adapters.has_router:
            raise KeyError(f"adapter {spec.name!r} is loaded without its router heads")
        return -1
    index = spec.task_index(task)
    if not adapters.has_task(task):
        raise KeyError(f"adapter {spec.name!r} is loaded without task {task!r}'s heads")
    return index


def _index(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)
