"""Adapter tasks from the offline corpus: one task per corpus domain (code,
qa, definitions, prose, fortunes), trained on its calibration split and
evaluated on its held-out split. What `elasticfleet adapters train` and the
adapters benchmark feed `elasticfleet.worker.adapters.training`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from elasticfleet.agent.corpus import ALL_SOURCES, build_corpus, token_windows
from elasticfleet.worker.adapters.training import TaskData
from elasticfleet.worker.model.generation import load_tokenizer


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
