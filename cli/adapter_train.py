"""`elasticfleet adapters train`: fine-tune an AsymLoRA set on SmolLM2 over
tasks drawn from the offline corpus, and write it as an adapter directory
that `adapters push` publishes.

A task is a corpus domain (code, qa, definitions, prose, fortunes): training
windows come from its calibration split, the held-out evaluation from its
evaluation split. The directory gets adapter.json and adapter.safetensors
(the set) plus training.json (the run: loss curve, per-task held-out
perplexity with and without the adapter, the command that reproduces it).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the command line's start-up
    from elasticfleet.worker.adapters.training import TaskData

DEFAULT_TASKS = ("code", "qa", "definitions")
TRAINING_REPORT = "training.json"


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_train_command(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train` to the `adapters` subcommands."""
    train = group.add_parser(
        "train", help="fine-tune an adapter set on SmolLM2 (base frozen) over corpus tasks"
    )
    train.add_argument("out", type=Path, help="adapter directory to write")
    train.add_argument("--name", default="tasks", help="adapter set name (default: tasks)")
    train.add_argument(
        "--tasks",
        type=_names,
        default=list(DEFAULT_TASKS),
        metavar="A,B,C",
        help=f"corpus domains to train one head each on (default: {','.join(DEFAULT_TASKS)})",
    )
    train.add_argument(
        "--router",
        action="store_true",
        help="train HydraLoRA's router instead of task heads (no task labels)",
    )
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, default=16.0)
    train.add_argument(
        "--modules",
        type=_names,
        metavar="M,N",
        help="projections to adapt (default: all attention and FFN projections)",
    )
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    train.add_argument("--time-limit", type=float, help="stop after this many seconds")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--window", type=int, default=128, help="tokens per training window")
    train.add_argument(
        "--windows-per-task", type=int, default=2, help="windows per task in every step"
    )
    train.add_argument(
        "--train-windows", type=int, default=512, help="training pool per task (windows)"
    )
    train.add_argument(
        "--eval-windows", type=int, default=16, help="held-out windows per task (evaluation)"
    )
    train.add_argument(
        "--sources",
        type=_names,
        metavar="S,T",
        help="corpus sources (default: all; 'python' alone needs no apt packages)",
    )
    train.add_argument("--cache-dir", type=Path, help="cache root (default: user cache dir)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")


def corpus_tasks(
    model_dir: Path,
    tasks: Sequence[str],
    window: int,
    train: int,
    held_out: int,
    *,
    cache_root: Path | None = None,
    sources: Sequence[str] | None = None,
    progress: bool = False,
) -> list[TaskData]:
    """One TaskData per corpus domain: `train` calibration windows and
    `held_out` evaluation windows of window + 1 tokens (the inputs plus
    their next-token targets). Builds the corpus if it is missing."""
    from elasticfleet.agent.corpus import ALL_SOURCES, build_corpus, token_windows
    from elasticfleet.worker.adapters.training import TaskData
    from elasticfleet.worker.model.generation import load_tokenizer

    chosen = tuple(sources or ALL_SOURCES)
    build_corpus(cache_root, sources=chosen, progress=progress)
    windows = functools.partial(
        token_windows,
        tokenizer=load_tokenizer(model_dir),
        window=window + 1,
        cache_root=cache_root,
        sources=chosen,
    )
    return [
        TaskData(
            task,
            windows("calibration", count=train, domains=[task]),
            windows("evaluation", count=held_out, domains=[task]),
        )
        for task in tasks
    ]


def run_train(args: argparse.Namespace) -> int:
    """Handler of `adapters train`."""
    from elasticfleet.worker.adapters.format import ALL_MODULES
    from elasticfleet.worker.adapters.training import (
        AdapterTrainingConfig,
        evaluate,
        train_adapters,
    )
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model

    config = AdapterTrainingConfig(
        layout="router" if args.router else "asym",
        name=args.name,
        rank=args.rank,
        alpha=args.alpha,
        modules=tuple(args.modules or ALL_MODULES),
        steps=args.steps,
        windows_per_task=args.windows_per_task,
        learning_rate=args.learning_rate,
        seed=args.seed,
        time_limit=args.time_limit,
    )
    progress = not args.no_progress
    path = prepare_model(args.cache_dir, progress=progress)
    data = corpus_tasks(
        path,
        args.tasks,
        args.window,
        args.train_windows,
        args.eval_windows,
        cache_root=args.cache_dir,
        sources=args.sources,
        progress=progress,
    )
    model = ElasticLlama.from_pretrained(path, packed=False)
    base = evaluate(model, data, {}, dict.fromkeys(args.tasks))
    result = train_adapters(model, data, config, base_model=MODEL_NAME, progress=progress)
    (adapters,) = result.sets.values()
    adapters.weights().save(args.out)
    report = {
        "command": " ".join(["elasticfleet", *sys.argv[1:]]),
        "layout": result.layout,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "trainable_parameters": result.trainable_parameters,
        "losses": [round(loss, 4) for loss in result.losses],
        "eval_perplexity": result.eval_perplexity,
        "base_perplexity": base,
    }
    (args.out / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    for task in args.tasks:
        print(f"{task}: held-out perplexity {base[task]:.2f} -> {result.eval_perplexity[task]:.2f}")
    print(f"{args.out}: {result.steps} steps in {result.seconds:.0f} s")
    return 0
