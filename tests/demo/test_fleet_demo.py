"""The local fleet demo (`elasticfleet fleet demo`): its figures, table and
record, its worker processes, and whole runs on the tiny model (the greedy
policy: the committed RL agent is trained for SmolLM2's 60 blocks) and on
the real one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL
from waiting import wait_for

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.cli import main
from elasticfleet.demo.fleet import (
    PLOT_FILE,
    RECORD_FILE,
    DemoError,
    DemoOptions,
    FleetDemo,
    demo_figures,
    demo_spec,
    run_demo,
)
from elasticfleet.demo.record import DemoResult, TickRecord, WorkerRow, phase_spans, render_table
from elasticfleet.operator.control import FleetEvent, TickReport, profile_for_model
from elasticfleet.operator.status import (
    Condition,
    ConditionStatus,
    DeviceMemory,
    FleetStatus,
    PlanSummary,
    WorkerStatus,
)
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.readiness import WorkerReady, read_ready_file

MIB = 2**20


@pytest.fixture(scope="module")
def smollm2() -> ModelProfile:
    return ModelProfile.load(DEFAULT_PROFILE)


# -- figures ---------------------------------------------------------------------


def test_figures_squeeze_the_budget_to_the_share_asked(smollm2: ModelProfile) -> None:
    figures = demo_figures(smollm2, 0.8)
    policy = demo_spec(smollm2.model_name, "rl").memory
    dense = PruningPlan.dense(smollm2.config.num_hidden_layers)
    weights = predict_memory(smollm2.config, dense, 0, 0, smollm2.dtype).weight_bytes
    assert figures.dense_weight_bytes == weights == 538_060_032
    # Squeezed: the budget is 80% of the dense weights (to the byte)...
    squeezed = figures.budget(policy, figures.squeeze_others_bytes)
    assert squeezed == pytest.approx(0.8 * weights, abs=1)
    # ... and the others and the worker's dense weights still fit the device.
    assert figures.squeeze_others_bytes + weights <= figures.total_bytes
    # Idle: the dense model fits with the KV cache of a full-context sequence.
    context = smollm2.config.max_position_embeddings
    full = predict_memory(smollm2.config, dense, 1, context, smollm2.dtype).total_bytes
    assert figures.budget(policy, 0) > full


@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0, 1.2])
def test_figures_refuse_a_squeeze_that_cannot_be_played(
    smollm2: ModelProfile, ratio: float
) -> None:
    with pytest.raises(ValueError, match=r"between 0\.5 and 1 times the dense weights"):
        demo_figures(smollm2, ratio)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "1"], "the demo needs at least 2 workers, got 1"),
        (["--policy", "static"], "policy must be one of rl, greedy, got 'static'"),
        (["--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
        (["--squeeze", "0.4"], "the squeeze must leave between 0.5 and 1 times"),
    ],
)
def test_bad_flags_are_refused_before_any_worker_starts(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "SmolLM2-135M-Instruct"  # a profiled name; no weights needed
    out = tmp_path / "out"
    assert main(["fleet", "demo", "--model", str(model), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_model_without_a_profile_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    assert main(["fleet", "demo", "--model", str(tmp_path / "mystery"), "--out", out]) == 2
    assert "no block profile for model 'mystery'" in capsys.readouterr().err


# -- records and rendering --------------------------------------------------------


def _report() -> TickReport:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    squeezed = WorkerStatus(
        "worker-0",
        reachable=True,
        device=DeviceMemory(total_bytes=2048 * MIB, used_bytes=1700 * MIB),
        budget_bytes=410 * MIB,
        weight_bytes=408 * MIB,
        plan=PlanSummary("p-faf8c18f4ac0", kept_attention=17, kept_ffn=24),
    )
    # Never reached: only what the loop knows without an answer.
    unknown = WorkerStatus("worker-1", message="WorkerUnreachable: refused")
    true = ConditionStatus.TRUE
    status = FleetStatus(
        workers=(squeezed, unknown),
        conditions=(
            Condition("Available", true, "WorkersServing", "1", when),
            Condition("Degraded", true, "WorkerUnreachable", "w1", when),
        ),
    )
    event = FleetEvent("Warning", "WorkerUnreachable", "worker-1: refused", "worker-1")
    return TickReport(outcomes=[], status=status, events=[event])


def test_a_tick_record_reads_the_status() -> None:
    record = TickRecord.from_report(3, "crash", "2026-01-01T00:00:00Z", _report())
    assert record.worker("worker-0") == WorkerRow(
        "worker-0",
        True,
        2048 * MIB,
        1700 * MIB,
        410 * MIB,
        17,
        24,
        0,
        0,
        408 * MIB,
        "p-faf8c18f4ac0",
        "",
    )
    unknown = record.worker("worker-1")
    assert not unknown.reachable and unknown.plan_id == "" and unknown.weight_bytes == 0
    assert record.condition("Degraded") and record.condition("Available")
    assert not record.condition("Progressing")
    assert record.conditions["Degraded"] == {
        "status": "True",
        "reason": "WorkerUnreachable",
        "message": "w1",
    }


def test_the_table_shows_every_worker_and_the_conditions() -> None:
    record = TickRecord.from_report(3, "crash", "2026-01-01T00:00:00Z", _report())
    lines = render_table(record).splitlines()
    assert lines[0] == (
        "tick 3 [crash]  Available=True (WorkersServing)  Degraded=True (WorkerUnreachable)"
    )
    assert lines[1].split() == [
        "worker", "device", "used", "/", "total", "budget", "attn", "ffn", "int8", "int4",
        "weights", "plan", "up",
    ]  # fmt: skip
    assert lines[2].split() == [
        "worker-0", "1.66", "GiB", "/", "2.00", "GiB", "410.00", "MiB", "17", "24", "0", "0",
        "408.00", "MiB", "p-faf8c18f4ac0", "yes",
    ]  # fmt: skip
    assert lines[3].split()[0] == "worker-1" and lines[3].split()[-2:] == ["-", "NO"]
    # Columns line up: every cell of a column starts where its header does.
    assert lines[2].index("p-faf8") == lines[1].index("plan") == lines[3].rindex("-")


def test_the_record_is_json_of_every_tick_and_answer(tmp_path: Path) -> None:
    result = DemoResult(settings={"model": TINY_MODEL})
    result.ticks.append(TickRecord.from_report(0, "crash", "t", _report()))
    result.write(tmp_path / "record.json")
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["settings"] == {"model": TINY_MODEL}
    assert written["answers"] == []
    (tick,) = written["ticks"]
    assert tick["phase"] == "crash" and tick["workers"][0]["kept_ffn"] == 24
    assert tick["events"] == [
        {
            "type": "Warning",
            "reason": "WorkerUnreachable",
            "message": "worker-1: refused",
            "pod": "worker-1",
        }
    ]


def test_phase_spans_group_consecutive_ticks() -> None:
    phases = ["plenty", "squeeze", "squeeze", "relax", "relax", "crash", "recover"]
    ticks = [TickRecord(i, phase, "t", (), {}, (), ()) for i, phase in enumerate(phases)]
    assert phase_spans(ticks) == [
        ("plenty", 0, 0),
        ("squeeze", 1, 2),
        ("relax", 3, 4),
        ("crash", 5, 5),
        ("recover", 6, 6),
    ]


# -- worker processes -------------------------------------------------------------


def test_a_failed_phase_stops_the_workers_and_keeps_the_record(
    tiny_worker_model: Path, tiny_profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(demo: FleetDemo) -> None:
        raise DemoError("squeeze: no new plan")

    monkeypatch.setattr(FleetDemo, "_squeeze", fail)
    options = DemoOptions(tiny_worker_model, tmp_path, policy="greedy", max_new_tokens=2)
    with pytest.raises(DemoError, match="squeeze: no new plan"):
        run_demo(options, profile_for_model(TINY_MODEL), say=lambda _line: None)
    # Both workers were stopped (SIGTERM: they drained) ...
    assert all("draining" in (tmp_path / f"worker-{i}.log").read_text() for i in (0, 1))
    # ... and what ran is on record.
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert {t["phase"] for t in record["ticks"]} == {"plenty"}
    assert [a["pod"] for a in record["answers"]] == ["worker-0", "worker-1"]
    assert (tmp_path / PLOT_FILE).exists()


# -- whole runs -------------------------------------------------------------------


def _pods(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["pod"]: w for w in record["workers"]}


def _last(ticks: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    return [t for t in ticks if t["phase"] == phase][-1]


def test_the_demo_runs_every_phase_on_the_tiny_model(
    tiny_worker_model: Path,
    tiny_profiles: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = ["fleet", "demo", "--model", str(tiny_worker_model), "--out", str(out)]
    assert main([*argv, "--policy", "greedy", "--max-new-tokens", "6"]) == 0
    stdout = capsys.readouterr().out
    record = json.loads((out / RECORD_FILE).read_text())
    ticks, answers = record["ticks"], record["answers"]
    layers = 4
    phases = ["plenty", "squeeze", "relax", "crash", "recover"]
    assert list(dict.fromkeys(t["phase"] for t in ticks)) == phases

    plenty = _pods(_last(ticks, "plenty"))
    dense_id = plenty["worker-0"]["plan_id"]
    dense_weights = plenty["worker-0"]["weight_bytes"]
    assert all(w["kept_attention"] == w["kept_ffn"] == layers for w in plenty.values())

    squeeze = [t for t in ticks if t["phase"] == "squeeze"]
    (change,) = squeeze[0]["changes"]
    assert change["pod"] == "worker-0"
    assert [e["reason"] for e in squeeze[0]["events"]] == ["PlanChanged"]
    squeezed = _pods(squeeze[-1])
    w0 = squeezed["worker-0"]
    assert w0["kept_attention"] + w0["kept_ffn"] < 2 * layers
    assert w0["weight_bytes"] < dense_weights
    assert w0["budget_bytes"] == pytest.approx(0.8 * dense_weights, abs=1)
    assert change["predictedBytes"] <= w0["budget_bytes"]
    assert squeezed["worker-1"]["plan_id"] == dense_id

    relaxed = _pods(_last(ticks, "relax"))["worker-0"]
    assert relaxed["kept_attention"] == relaxed["kept_ffn"] == layers
    assert relaxed["weight_bytes"] == dense_weights and relaxed["plan_id"] == dense_id

    crash = _last(ticks, "crash")
    assert crash["conditions"]["Degraded"]["status"] == "True"
    assert crash["conditions"]["Degraded"]["reason"] == "WorkerUnreachable"
    assert "worker-1" in crash["conditions"]["Degraded"]["message"]
    assert not _pods(crash)["worker-1"]["reachable"]
    assert _pods(crash)["worker-0"]["plan_id"] == dense_id

    recover = _last(ticks, "recover")
    assert recover["conditions"]["Degraded"]["status"] == "False"
    assert all(w["reachable"] for w in recover["workers"])

    # Answers came from the plan in force: pruned under the squeeze, and
    # after the restore the same text as before it.
    by_phase = {(a["phase"], a["pod"]): a for a in answers}
    assert by_phase[("squeeze", "worker-0")]["plan_ids"] == [w0["plan_id"]]
    assert by_phase[("squeeze", "worker-1")]["plan_ids"] == [dense_id]
    assert by_phase[("relax", "worker-0")]["text"] == by_phase[("plenty", "worker-0")]["text"]
    assert all(a["tokens"] > 0 for a in answers)

    assert (out / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    # Every start logged; the restarted worker and worker-0 drained on exit.
    assert "draining" in (out / "worker-0.log").read_text()
    assert "draining" in (out / "worker-1.2.log").read_text()
    assert "draining" not in (out / "worker-1.log").read_text()  # SIGKILLed
    for heading in ("Phase 1", "Phase 2", "Phase 3", "Phase 4", "Recovered"):
        assert heading in stdout


@pytest.mark.real_model
def test_the_demo_runs_on_the_real_model(
    real_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fleet", "demo", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["settings"]["policy"] == "rl"
    squeezed = _pods(_last(record["ticks"], "squeeze"))["worker-0"]
    below_full = squeezed["int8_blocks"] + squeezed["int4_blocks"]
    assert below_full > 0 or squeezed["kept_attention"] + squeezed["kept_ffn"] < 60
    assert "Recovered" in capsys.readouterr().out


def _ready(path: Path) -> WorkerReady | None:
    """A worker's ready document once it has written it."""
    try:
        return read_ready_file(path)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _sigint_default() -> Iterator[None]:
    """SIGINT handled while a child starts, so the child gets it at its
    default: a suite run as a background job of a shell without job control
    ignores SIGINT, a child inherits that, and Ctrl-C could not reach it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_demo_and_every_worker(
    tiny_worker_model: Path, tiny_profiles: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "elasticfleet.cli", "fleet", "demo",
        "--model", str(tiny_worker_model), "--out", str(out), "--policy", "greedy",
    ]  # fmt: skip
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as printed, stderr.open("w") as errors, _sigint_default():
        demo = subprocess.Popen(command, stdout=printed, stderr=errors)
    worker_1 = 0
    try:
        # Interrupted once both workers listen, while the demo certainly still
        # runs: worker-1 is paused from the moment it is ready, so no phase can
        # end until it resumes (on a busy machine the tiny model's whole demo
        # could otherwise finish before the signal lands).
        ready = out / "worker-1.ready.json"
        worker_1 = wait_for("worker-1 ready", lambda: _ready(ready), 120).pid
        os.kill(worker_1, signal.SIGSTOP)
        wait_for("both workers", lambda: "worker-1 listens on" in stdout.read_text(), 120)
        demo.send_signal(signal.SIGINT)
        os.kill(worker_1, signal.SIGCONT)
        demo.wait(60)
    finally:
        if worker_1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_1, signal.SIGCONT)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    err = stderr.read_text()
    assert demo.returncode == 130, err
    assert "interrupted; the workers are stopped" in err
    for pod in ("worker-0", "worker-1"):  # each was told to stop and drained
        assert "draining" in (out / f"{pod}.log").read_text()
