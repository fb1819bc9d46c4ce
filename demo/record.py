"""What the local fleet demo shows and keeps: per-tick records of the fleet's
status, the table printed for each tick, the JSON record and the timeline plot.

Pure functions and small classes over what the control loop reports, apart
from the processes the demo runs (fleet.py), so they are tested alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elasticfleet.operator.control import FleetEvent, TickReport
from elasticfleet.operator.status import DeviceMemory, PlanRecord, PlanSummary, WorkerStatus


def format_bytes(count: int) -> str:
    """Bytes for people: GiB, MiB or KiB with two decimals."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count / 2**10:.2f} KiB"


@dataclass(frozen=True)
class WorkerRow:
    """One worker in one tick, as the fleet's status shows it."""

    pod: str
    reachable: bool
    total_bytes: int
    used_bytes: int
    budget_bytes: int
    kept_attention: int
    kept_ffn: int
    int8_blocks: int
    int4_blocks: int
    weight_bytes: int
    plan_id: str
    message: str

    @classmethod
    def from_status(cls, entry: WorkerStatus) -> WorkerRow:
        """From a `status.workers` entry; a worker never reached has zeros."""
        device = entry.device or DeviceMemory()
        plan = entry.plan or PlanSummary()
        return cls(
            pod=entry.pod,
            reachable=entry.reachable,
            total_bytes=device.total_bytes,
            used_bytes=device.used_bytes,
            budget_bytes=entry.budget_bytes or 0,
            kept_attention=plan.kept_attention,
            kept_ffn=plan.kept_ffn,
            int8_blocks=plan.int8_blocks,
            int4_blocks=plan.int4_blocks,
            weight_bytes=entry.weight_bytes or 0,
            plan_id=plan.id,
            message=entry.message,
        )


@dataclass(frozen=True)
class TickRecord:
    """One control tick: the workers, the fleet's conditions (status,
    reason and message by type), the plan changes (the status's lastPlans
    entries) and the Events it posted."""

    tick: int
    phase: str
    time: str
    workers: tuple[WorkerRow, ...]
    conditions: dict[str, dict[str, str]]
    changes: tuple[PlanRecord, ...]
    events: tuple[FleetEvent, ...]

    @classmethod
    def from_report(cls, tick: int, phase: str, time: str, report: TickReport) -> TickRecord:
        status = report.status
        return cls(
            tick=tick,
            phase=phase,
            time=time,
            workers=tuple(WorkerRow.from_status(w) for w in status.workers or ()),
            conditions={
                c.type: {"status": c.status.value, "reason": c.reason, "message": c.message}
                for c in status.conditions or ()
            },
            changes=tuple(o.record for o in report.outcomes if o.record is not None),
            events=tuple(report.events),
        )

    def worker(self, pod: str) -> WorkerRow:
        return next(w for w in self.workers if w.pod == pod)

    def condition(self, kind: str) -> bool:
        return self.conditions.get(kind, {}).get("status") == "True"

    def to_json(self) -> dict[str, Any]:
        """The record as JSON; the plan changes as the status shows them."""
        return {**asdict(self), "changes": [change.to_dict() for change in self.changes]}


TABLE_COLUMNS = (
    "worker",
    "device used / total",
    "budget",
    "attn",
    "ffn",
    "int8",
    "int4",
    "weights",
    "plan",
    "up",
)


def render_table(record: TickRecord) -> str:
    """The tick as a compact table, headed by the fleet's conditions."""
    heading = f"tick {record.tick} [{record.phase}]"
    for kind in ("Available", "Degraded"):
        condition = record.conditions.get(kind, {})
        heading += f"  {kind}={condition.get('status', '?')} ({condition.get('reason', '')})"
    rows = [TABLE_COLUMNS]
    for w in record.workers:
        rows.append(
            (
                w.pod,
                f"{format_bytes(w.used_bytes)} / {format_bytes(w.total_bytes)}",
                format_bytes(w.budget_bytes),
                str(w.kept_attention),
                str(w.kept_ffn),
                str(w.int8_blocks),
                str(w.int4_blocks),
                format_bytes(w.weight_bytes),
                w.plan_id or "-",
                "yes" if w.reachable else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join([heading, *(line.rstrip() for line in lines)])


@dataclass(frozen=True)
class Answer:
    """A worker's completion of the demo prompt, and the plans that produced it."""

    phase: str
    pod: str
    text: str
    tokens: int
    plan_ids: tuple[str, ...]


@dataclass
class DemoResult:
    """Everything the demo saw: every tick and every answer."""

    settings: dict[str, Any]
    ticks: list[TickRecord] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "ticks": [t.to_json() for t in self.ticks],
            "answers": [asdict(a) for a in self.answers],
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def phase_spans(ticks: Sequence[TickRecord]) -> list[tuple[str, int, int]]:
    """(phase, first tick, last tick) for each run of ticks in one phase."""
    spans: list[tuple[str, int, int]] = []
    for record in ticks:
        if spans and spans[-1][0] == record.phase:
            spans[-1] = (record.phase, spans[-1][1], record.tick)
        else:
            spans.append((record.phase, record.tick, record.tick))
    return spans


def plot_timeline(ticks: Sequence[TickRecord], path: Path, title: str) -> None:
    """Each worker's budget and kept blocks per tick as a PNG: phases
    shaded, ticks where a worker did not answer crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (budget_axis, blocks_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for index, pod in enumerate(w.pod for w in ticks[0].workers):
        # The first worker drawn widest, so that lines that coincide all show.
        color, width = f"C{index}", max(3.0 - index, 1.0)
        x = [t.tick for t in ticks]
        rows = [t.worker(pod) for t in ticks]
        budgets = [r.budget_bytes / 2**20 for r in rows]
        style = {"where": "mid", "color": color, "lw": width}
        budget_axis.step(x, budgets, label=pod, **style)
        blocks_axis.step(x, [r.kept_attention for r in rows], **style)
        blocks_axis.step(x, [r.kept_ffn for r in rows], ls="--", **style)
        down = [(t, r.kept_attention) for t, r in zip(x, rows, strict=True) if not r.reachable]
        if down:
            blocks_axis.scatter(*zip(*down, strict=True), marker="x", color=color, s=80, zorder=3)
    blocks_axis.plot([], [], color="grey", label="attention blocks kept")
    blocks_axis.plot([], [], color="grey", ls="--", label="FFN blocks kept")
    blocks_axis.scatter([], [], marker="x", color="grey", label="unreachable")
    for number, (phase, first, last) in enumerate(phase_spans(ticks)):
        for axis in (budget_axis, blocks_axis):
            axis.axvspan(first - 0.5, last + 0.5, color="0.92" if number % 2 else "0.97", lw=0)
        middle = (first + last) / 2
        transform = budget_axis.get_xaxis_transform()
        budget_axis.text(middle, 1.02, phase, ha="center", transform=transform)
    figure.suptitle(title)
    budget_axis.set_ylabel("budget (MiB)")
    budget_axis.set_ylim(bottom=0)
    budget_axis.legend(loc="lower left")
    blocks_axis.set_ylabel("blocks kept")
    blocks_axis.set_ylim(bottom=0)
    blocks_axis.set_xlabel("control tick")
    blocks_axis.legend(loc="lower left", ncols=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
