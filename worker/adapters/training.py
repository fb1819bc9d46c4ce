"""Fine-tuning adapter sets on a frozen base model, several tasks at once.

One loop serves every layout the benchmark compares, because a layout is only
a choice of which adapter set and head each task's rows go through:

- `asym`: one set, one shared A, a B head per task (AsymLoRA);
- `shared`: one set with a single head that every task uses (plain LoRA);
- `separate`: one single-head set per task (LoRA-MoE-style specialisation);
- `router`: one set whose rows mix all heads by the learned router
  (HydraLoRA; trained without task labels).

Every step takes the same number of windows from every task, so all layouts
see the same data in the same order for a given seed. Training needs the
plain (unpacked) weight layout: oneDNN's packed kernels have no backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import (
    AdapterBatch,
    AdapterChoice,
    AdapterSet,
    projection_shape,
)
from elasticfleet.worker.adapters.names import ALL_MODULES
from elasticfleet.worker.model.llama import ElasticLlama

LAYOUTS = ("asym", "shared", "separate", "router")


@dataclass(frozen=True)
class TaskData:
    """One task's token windows [N, T]: training from calibration text,
    evaluation from held-out text."""

    name: str
    train: torch.Tensor
    evaluation: torch.Tensor


@dataclass(frozen=True)
class AdapterTrainingConfig:
    """How a layout is trained. `steps` and `time_limit` both bound the run."""

    layout: str = "asym"
    name: str = "tasks"
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = ALL_MODULES
    steps: int = 100
    windows_per_task: int = 2
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    seed: int = 0
    time_limit: float | None = None
    eval_batch: int = 8

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}"
            )
        if self.steps < 1 or self.windows_per_task < 1 or self.eval_batch < 1:
            raise ValueError("steps, windows_per_task and eval_batch must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit}")


@dataclass
class AdapterTrainingResult:
    """What a run produced: the trained sets and how it went."""

    layout: str
    sets: dict[str, AdapterSet]
    route: dict[str, AdapterChoice]
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    eval_perplexity: dict[str, float] = field(default_factory=dict)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for s in self.sets.values() for p in s.parameters())


def build_layout(
    config: AdapterTrainingConfig, tasks: Sequence[str], model: ElasticLlama, base_model: str
) -> tuple[dict[str, AdapterSet], dict[str, AdapterChoice]]:
    """Fresh adapter sets for a layout, and which set and head each task uses."""

    def spec(name: str, heads: Sequence[str], rank: int, router: bool = False) -> AdapterSpec:
        return AdapterSpec(
            name=name,
            base_model=base_model,
            num_layers=model.config.num_hidden_layers,
            rank=rank,
            alpha=config.alpha * rank / config.rank,  # keep alpha / rank fixed across layouts
            modules=config.modules,
            tasks=tuple(heads),
            router=router,
        )

    seed = config.seed
    if config.layout == "separate":
        sets = {
            f"{config.name}-{t}": AdapterSet.create(
                spec(f"{config.name}-{t}", [t], config.rank), model.config, seed=seed + i
            )
            for i, t in enumerate(tasks)
        }
        return sets, {t: AdapterChoice(f"{config.name}-{t}", t) for t in tasks}
    if config.layout == "shared":
        rank = shared_rank(config.rank, len(tasks), model, config.modules)
        adapters = AdapterSet.create(spec(config.name, ["shared"], rank), model.config, seed=seed)
        return {config.name: adapters}, {t: AdapterChoice(config.name, "shared") for t in tasks}
    router = config.layout == "router"
    adapters = AdapterSet.create(
        spec(config.name, tasks, config.rank, router), model.config, seed=seed
    )
    route = {t: AdapterChoice(config.name, None if router else t) for t in tasks}
    return {config.name: adapters}, route


def shared_rank(rank: int, tasks: int, model: ElasticLlama, modules: Sequence[str]) -> int:
    """The rank at which one plain LoRA has as many parameters as an AsymLoRA
    set of `rank` with `tasks` heads (rounded to the nearest rank)."""
    asym = plain = 0
    for module in modules:
        fan_in, fan_out = projection_shape(model.config, module)
        asym += rank * (fan_in + tasks * fan_out)
        plain += fan_in + fan_out
    return max(1, round(asym / plain))


def _lr_factor(step: int, config: AdapterTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss(
    model: ElasticLlama, ids: torch.Tensor, batch: AdapterBatch, *, mean: bool = True
) -> torch.Tensor:
    """Next-token cross-entropy of each window (mean over all tokens, or summed)."""
    logits = model(ids[:, :-1], adapters=batch)  # [B, T-1, V]
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        ids[:, 1:].flatten(),
        reduction="mean" if mean else "sum",
    )


def train_adapters(
    model: ElasticLlama,
    data: Sequence[TaskData],
    config: AdapterTrainingConfig,
    *,
    base_model: str = "SmolLM2-135M-Instruct",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> AdapterTrainingResult:
    """Train one layout on every task's windows and evaluate it per task."""
    if model.packed:
        raise ValueError("training needs the plain weight layout: load the model with packed=False")
    if not data:
        raise ValueError("no tasks to train on")
    tasks = [task.name for task in data]
    sets, route = build_layout(config, tasks, model, base_model)
    parameters = [p for s in sets.values() for p in s.parameters()]
    for param in parameters:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    generator = torch.Generator().manual_seed(config.seed)
    rows = [route[t] for t in tasks for _ in range(config.windows_per_task)]
    batch = AdapterBatch(sets, rows)
    result = AdapterTrainingResult(config.layout, sets, route, steps=0, seconds=0.0)
    start = time.monotonic()
    bar = tqdm(total=config.steps, desc=f"train {config.layout}", disable=not progress)
    for step in range(config.steps):
        if config.time_limit is not None and time.monotonic() - start >= config.time_limit:
            break
        picks = [
            task.train[
                torch.randint(len(task.train), (config.windows_per_task,), generator=generator)
            ]
            for task in data
        ]
        loss = _loss(model, torch.cat(picks), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        result.losses.append(float(loss.detach()))
        result.steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, result.losses[-1])
    bar.close()
    result.seconds = time.monotonic() - start
    for param in parameters:
        param.requires_grad_(False)
    result.eval_perplexity = evaluate(model, data, sets, route, batch_size=config.eval_batch)
    return result


@torch.no_grad()
def evaluate(
    model: ElasticLlama,
    data: Sequence[TaskData],
    sets: Mapping[str, AdapterSet],
    route: Mapping[str, AdapterChoice | None],
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Held-out perplexity per task, each task's windows through its route
    (None routes through the base model)."""
    results: dict[str, float] = {}
    for task in data:
        total, count = 0.0, 0
        for chunk in torch.split(task.evaluation, batch_size):
            batch = AdapterBatch(sets, [route[task.name]] * len(chunk))
            total += float(_loss(model, chunk, batch, mean=False))
            count += chunk.numel() - len(chunk)
        results[task.name] = math.exp(total / count)
    return results
