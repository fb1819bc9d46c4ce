"""`elasticfleet adapters train` end to end on the real model (a few tiny
steps on the Python-only corpus, which needs no apt packages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticfleet.cli import main
from elasticfleet.worker.adapters.weights import AdapterWeights

SMALL = [
    "--sources", "python", "--steps", "2", "--window", "16", "--windows-per-task", "1",
    "--train-windows", "4", "--eval-windows", "2", "--rank", "2", "--modules", "q_proj,down_proj",
    "--no-progress",
]  # fmt: skip


@pytest.mark.real_model
def test_train_writes_an_adapter_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    assert (
        main(["adapters", "train", str(out), "--tasks", "code,prose", "--name", "py", *SMALL]) == 0
    )
    weights = AdapterWeights.load(out)
    assert weights.spec.tasks == ("code", "prose")
    assert weights.spec.modules == ("q_proj", "down_proj")
    assert weights.spec.base_model == "SmolLM2-135M-Instruct"
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 2 and len(report["losses"]) == 2
    assert set(report["eval_perplexity"]) == set(report["base_perplexity"]) == {"code", "prose"}
    assert "held-out perplexity" in capsys.readouterr().out


@pytest.mark.real_model
def test_unknown_task_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "train", str(tmp_path / "x"), "--tasks", "poetry", *SMALL]) == 2
    assert "unknown domain(s) 'poetry'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
