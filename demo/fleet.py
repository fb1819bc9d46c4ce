"""The local fleet demo: what elasticfleet is for, on one machine, without
Kubernetes or a GPU.

The operator's point (a worker whose device runs short of memory is shrunk
in place instead of evicted, gets its blocks back when memory returns, and a
dead worker degrades the fleet without holding up the others) otherwise
shows only in a cluster with GPUs. Here nothing is mocked but the devices
and kubelet: real `elasticfleet worker` processes serve the real model on
127.0.0.1, and the real `FleetController`, the loop the kopf operator runs,
plans them tick by tick. Each worker reports a simulated device (a JSON file
it re-reads on every GetStats); the demo plays "another process took GPU
memory" by rewriting that file, and plays a crashed pod with SIGKILL.

Every figure is derived from the memory model (`predict_memory` on the
profile's config), so the phases happen the same way on any machine and for
any profiled model: the device holds four times the dense weights, the fleet
budgets half of what other processes leave (twice the dense weights: the
dense plan fits with room for its KV cache, even one sequence of the full
context), and the squeeze leaves a budget of a chosen share of the dense
weights (0.8 by default), so blocks must go whatever the load. Answers are
greedy, so a plan always gives the same answer: the dense answer after the
restore must be the one from before the squeeze.

The pure parts (figures and the fleet spec here; tick records, the table,
the JSON record and the plot in record.py) are functions and small classes;
`LocalFleet` owns the worker processes and always stops them; `FleetDemo`
runs the phases and checks that each did what it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.registry import ADAPTIVE_POLICIES
from elasticfleet.demo.record import (
    Answer,
    DemoResult,
    TickRecord,
    WorkerRow,
    format_bytes,
    plot_timeline,
    render_table,
)
from elasticfleet.operator.budget import DeviceFigures, derive_budget
from elasticfleet.operator.control import (
    FleetController,
    FleetEvent,
    WorkerEndpoint,
    plaintext_connect,
    plan_id,
    utc_now,
)
from elasticfleet.operator.spec import FleetSpec, MemoryPolicy
from elasticfleet.operator.status import FleetStatus
from elasticfleet.operator.wire import timestamp
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.process import WorkerProcess
from elasticfleet.worker.serving.telemetry import write_simulated_device

# The simulated device holds this many times the dense weights.
DEVICE_TO_WEIGHTS = 4
# The fleet budgets this share of what other processes leave on a device.
BUDGET_FRACTION = 0.5
# A phase ticks until a tick changes no plan; more ticks than this is a fault.
MAX_SETTLE_TICKS = 4
ANSWER_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
RECORD_FILE = "fleet-demo.json"
PLOT_FILE = "timeline.png"

Say = Callable[[str], None]


class DemoError(RuntimeError):
    """A phase did not do what the demo shows it doing."""


@dataclass(frozen=True)
class DemoFigures:
    """The simulated devices, in bytes: their total memory, and what other
    processes hold on a squeezed one."""

    dense_weight_bytes: int
    total_bytes: int
    squeeze_others_bytes: int

    def budget(self, policy: MemoryPolicy, others_bytes: int) -> int:
        """The budget the operator derives under `policy` for a device on
        which other processes hold `others_bytes`."""
        return derive_budget(policy, DeviceFigures(self.total_bytes, others_bytes, 0))


def check_squeeze(squeeze_ratio: float) -> None:
    """ValueError unless the squeeze can be played: below the budget
    fraction, the other processes and the worker's own weights would not fit
    on the device together; at 1 or more, nothing needs to go."""
    if not BUDGET_FRACTION < squeeze_ratio < 1:
        raise ValueError(
            f"the squeeze must leave between {BUDGET_FRACTION} and 1 times the dense "
            f"weights, got {squeeze_ratio}"
        )


def demo_figures(profile: ModelProfile, squeeze_ratio: float = 0.8) -> DemoFigures:
    """Figures for `profile`'s model: squeezed, a worker's budget is
    `squeeze_ratio` of the dense weights (see the module docstring)."""
    check_squeeze(squeeze_ratio)
    weights = predict_memory(profile.config, None, 0, 0, profile.dtype).weight_bytes
    total = DEVICE_TO_WEIGHTS * weights
    usable = math.ceil(squeeze_ratio * weights / BUDGET_FRACTION)
    return DemoFigures(weights, total, total - usable)


def demo_spec(model_name: str, policy: str) -> FleetSpec:
    """The ElasticFleet the demo's controller plans, as a manifest would give it."""
    return FleetSpec.parse(
        "local",
        "demo",
        {
            "model": {"name": model_name},
            "worker": {"image": "local", "threads": 1},
            "memoryPolicy": {
                "policy": policy,
                "budget": {"fraction": BUDGET_FRACTION},
            },
        },
    )


class LocalFleet:
    """Workers `worker-0` ... as `elasticfleet worker` processes on 127.0.0.1,
    each serving `model_dir` on its own simulated device, one torch thread
    each; device files and logs in `out`. Whoever starts it calls `stop` in
    a `finally`, so that every worker goes, whatever ends the run (an error,
    Ctrl-C)."""

    def __init__(
        self, model_dir: Path, out: Path, figures: DemoFigures, size: int, start_plan: str
    ) -> None:
        self.model_dir = model_dir
        self.out = out
        self.figures = figures
        self.start_plan = start_plan
        self.pods = [f"worker-{index}" for index in range(size)]
        self.workers: dict[str, WorkerProcess] = {}
        self._starts: dict[str, int] = {}

    def device(self, pod: str) -> Path:
        return self.out / f"{pod}.device.json"

    def set_others(self, pod: str, others_bytes: int) -> None:
        """Other processes now hold `others_bytes` of `pod`'s device."""
        write_simulated_device(self.device(pod), self.figures.total_bytes, others_bytes)

    def start(self) -> None:
        """Start every worker at once, on idle devices; returns when all listen."""
        for pod in self.pods:
            self.set_others(pod, 0)
        pool = ThreadPoolExecutor(len(self.pods))
        started = [pool.submit(self.start_worker, pod) for pod in self.pods]
        try:
            for future in started:
                future.result()  # the first failure, if any; the others stop on exit
        finally:
            # Interrupted (Ctrl-C) or failed, wait until every start has
            # registered its worker or failed, so that stop() sees them all.
            pool.shutdown()

    def start_worker(self, pod: str) -> WorkerProcess:
        """Start (or restart) `pod`; each start logs to a file of its own."""
        count = self._starts[pod] = self._starts.get(pod, 0) + 1
        log = self.out / (f"{pod}.log" if count == 1 else f"{pod}.{count}.log")
        args = [
            "--model", str(self.model_dir), "--host", "127.0.0.1", "--port", "0",
            "--threads", "1", "--simulated-device", str(self.device(pod)),
            "--budget-fraction", str(BUDGET_FRACTION), "--plan-id", self.start_plan,
        ]  # fmt: skip
        worker = self.workers[pod] = WorkerProcess.start(args, log)
        return worker

    def endpoints(self) -> list[WorkerEndpoint]:
        """Every worker, running or not (a killed one keeps its last address)."""
        return [WorkerEndpoint(pod, self.workers[pod].address) for pod in self.pods]

    def kill(self, pod: str) -> None:
        """SIGKILL, as when a pod's process crashes."""
        self.workers[pod].kill()

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL if it does not drain);
        one that fails to stop does not keep the others running."""
        with contextlib.ExitStack() as stopping:
            for worker in self.workers.values():
                stopping.callback(worker.stop, STOP_TIMEOUT_S)


class _EventPrinter:
    """The controller's sink: Events printed as they are posted; the status
    is what each tick returns, so it is not kept here."""

    def __init__(self, say: Say) -> None:
        self.say = say

    async def patch_status(self, status: FleetStatus) -> None:
        pass

    async def post_event(self, event: FleetEvent) -> None:
        self.say(f"  Event {event.type} {event.reason}: {event.message}")


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: which model, how many workers, which policy, how
    hard the squeeze, which prompt, and where its output goes."""

    model_dir: Path
    out: Path
    workers: int = 2
    policy: str = "rl"
    squeeze_ratio: float = 0.8
    prompt: str = "Why is the sky blue?"
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if self.workers < 2:
            raise ValueError(f"the demo needs at least 2 workers, got {self.workers}")
        if self.policy not in ADAPTIVE_POLICIES:
            raise ValueError(
                f"policy must be one of {', '.join(ADAPTIVE_POLICIES)}, got {self.policy!r}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        check_squeeze(self.squeeze_ratio)


def expect(holds: bool, what: str) -> None:
    """DemoError saying `what` went wrong, unless the phase's outcome `holds`."""
    if not holds:
        raise DemoError(what)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class FleetDemo:
    """The phases, over a started `LocalFleet`: plenty of memory, one worker
    squeezed, memory back, one worker killed and restarted. Each phase says
    what it does and what should follow, ticks the controller until no plan
    changes, and raises DemoError if what should follow did not."""

    def __init__(
        self,
        fleet: LocalFleet,
        profile: ModelProfile,
        options: DemoOptions,
        say: Say = print,
    ) -> None:
        self.fleet = fleet
        self.profile = profile
        self.options = options
        self.say = say
        self.figures = fleet.figures
        self.spec = demo_spec(profile.model_name, options.policy)
        self.layers = profile.config.num_hidden_layers
        self.squeezed, self.crashed = fleet.pods[0], fleet.pods[1]
        self.result = DemoResult(
            settings={
                "model": profile.model_name,
                "policy": options.policy,
                "workers": options.workers,
                "squeeze_ratio": options.squeeze_ratio,
                "budget_fraction": BUDGET_FRACTION,
                "prompt": options.prompt,
                "max_new_tokens": options.max_new_tokens,
                "figures": asdict(self.figures),
            }
        )
        self.controller = FleetController(self.spec, profile, plaintext_connect)
        self.events = _EventPrinter(say)
        self.plenty_answers: dict[str, Answer] = {}

    async def run(self) -> DemoResult:
        """Every phase in turn; the controller is closed at the end."""
        try:
            await self._plenty()
            await self._squeeze()
            await self._relax()
            await self._crash()
        finally:
            await self.controller.close()
        return self.result

    def _budget(self, others_bytes: int) -> int:
        return self.figures.budget(self.spec.memory, others_bytes)

    def _headline(self, title: str, story: str) -> None:
        self.say(f"\n=== {title} ===")
        self.say(story)

    async def _tick(self, phase: str) -> TickRecord:
        report = await self.controller.tick(self.fleet.endpoints(), self.events)
        record = TickRecord.from_report(len(self.result.ticks), phase, timestamp(utc_now()), report)
        self.result.ticks.append(record)
        self.say(render_table(record))
        return record

    async def _settle(self, phase: str) -> TickRecord:
        """Tick until a tick changes no plan; that tick's record."""
        for _ in range(MAX_SETTLE_TICKS):
            record = await self._tick(phase)
            if not record.changes:
                return record
        raise DemoError(f"{phase}: plans still changing after {MAX_SETTLE_TICKS} ticks")

    async def _answer(self, phase: str, pods: Sequence[str]) -> dict[str, Answer]:
        """Each of `pods` completes the prompt (at once); printed and recorded."""
        request = generate_request(
            self.options.prompt,
            chat_template=True,
            max_new_tokens=self.options.max_new_tokens,
        )

        async def ask(pod: str) -> Answer:
            async with AsyncWorkerClient(self.fleet.workers[pod].address) as client:
                result = await client.complete(request, timeout=ANSWER_TIMEOUT_S)
            plans = tuple(sorted({m.plan_id for m in result.messages}))
            return Answer(phase, pod, result.text, len(result.token_ids), plans)

        answers = await asyncio.gather(*(ask(pod) for pod in pods))
        for answer in answers:
            self.say(
                f"  {answer.pod} answers under plan {', '.join(answer.plan_ids)} "
                f"({answer.tokens} tokens): {_one_line(answer.text)!r}"
            )
        self.result.answers.extend(answers)
        return {a.pod: a for a in answers}

    def _dense(self, row: WorkerRow) -> bool:
        full = row.int8_blocks == row.int4_blocks == 0
        return full and row.kept_attention == row.kept_ffn == self.layers

    async def _plenty(self) -> None:
        figures = self.figures
        self._headline(
            "Phase 1: plenty of memory",
            f"Each worker's simulated device holds {format_bytes(figures.total_bytes)} and "
            f"nothing else uses it. The fleet budgets {BUDGET_FRACTION:.0%} of what other "
            f"processes leave: {format_bytes(self._budget(0))}, room for the dense weights "
            f"({format_bytes(figures.dense_weight_bytes)}) and their KV cache. Expect: every "
            f"worker keeps all {2 * self.layers} blocks.",
        )
        record = await self._settle("plenty")
        expect(all(self._dense(w) for w in record.workers), "plenty: a worker lost blocks")
        self.plenty_answers = await self._answer("plenty", self.fleet.pods)

    async def _squeeze(self) -> None:
        pod, other = self.squeezed, self.crashed
        before = self.result.ticks[-1]
        others = self.figures.squeeze_others_bytes
        budget = self._budget(others)
        self._headline(
            f"Phase 2: {pod}'s device is squeezed",
            f"Another process takes {format_bytes(others)} of {pod}'s device. Its budget "
            f"falls to {format_bytes(budget)}, "
            f"{budget / self.figures.dense_weight_bytes:.0%} of the dense weights: the dense "
            f"model no longer fits. Expect: the operator pushes {pod} a smaller plan; "
            f"{other} keeps its plan.",
        )
        self.fleet.set_others(pod, others)
        first = await self._tick("squeeze")
        changes = [c for c in first.changes if c.pod == pod]
        expect(bool(changes), f"squeeze: {pod} got no new plan")
        settled = await self._settle("squeeze")
        row = settled.worker(pod)
        expect(not self._dense(row), f"squeeze: {pod} still runs the dense model")
        expect(row.budget_bytes == budget, f"squeeze: {pod}'s budget is not {budget}")
        expect(
            row.weight_bytes < before.worker(pod).weight_bytes,
            f"squeeze: {pod} did not free weights",
        )
        expect(
            settled.worker(other).plan_id == before.worker(other).plan_id,
            f"squeeze: {other}'s plan changed",
        )
        change = changes[0]
        self.say(
            f"{pod} now keeps {row.kept_attention}/{self.layers} attention and "
            f"{row.kept_ffn}/{self.layers} FFN blocks, {row.int8_blocks} of them at int8 and "
            f"{row.int4_blocks} at int4 (plan {row.plan_id}): attention "
            f"dropped in layers {list(change.plan.dropped_attention)}, "
            f"FFN in {list(change.plan.dropped_ffn)}.\n"
            f"Weights {format_bytes(before.worker(pod).weight_bytes)} -> "
            f"{format_bytes(row.weight_bytes)}; predicted with KV "
            f"{format_bytes(change.predicted_bytes)} within the budget of "
            f"{format_bytes(change.budget_bytes)}; predicted perplexity "
            f"x{change.predicted_perplexity_ratio:.2f} of the dense model's.\n"
            f"Both workers answer: {pod} under its new plan, {other} still dense."
        )
        answers = await self._answer("squeeze", [pod, other])
        expect(
            answers[pod].plan_ids == (row.plan_id,),
            f"squeeze: {pod} answered under {answers[pod].plan_ids}, not {row.plan_id}",
        )

    async def _relax(self) -> None:
        pod = self.squeezed
        self._headline(
            "Phase 3: the memory comes back",
            f"The other process on {pod}'s device exits. Its budget returns to "
            f"{format_bytes(self._budget(0))}. Expect: every block restored.",
        )
        self.fleet.set_others(pod, 0)
        record = await self._settle("relax")
        row = record.worker(pod)
        expect(self._dense(row), f"relax: {pod} did not get every block back")
        expect(
            row.weight_bytes == self.figures.dense_weight_bytes,
            f"relax: {pod} holds {row.weight_bytes} bytes of weights, not the dense "
            f"{self.figures.dense_weight_bytes}",
        )
        answer = (await self._answer("relax", [pod]))[pod]
        same = answer.text == self.plenty_answers[pod].text
        self.say(
            f"  {pod}'s answer is {'the same' if same else 'NOT the same'} as in phase 1: "
            "restored blocks are bit-identical to the ones dropped."
        )
        expect(same, f"relax: {pod}'s dense answer changed after the restore")

    async def _crash(self) -> None:
        pod, survivor = self.crashed, self.squeezed
        before = self.result.ticks[-1].worker(survivor)
        self._headline(
            f"Phase 4: {pod} crashes",
            f"{pod} is killed with SIGKILL, as a crashed pod's process is. Expect: the fleet "
            f"is Degraded naming {pod}; {survivor} is not held up and keeps its plan.",
        )
        await asyncio.to_thread(self.fleet.kill, pod)
        record = await self._tick("crash")
        degraded = record.conditions.get("Degraded", {})
        expect(
            record.condition("Degraded") and pod in degraded.get("message", ""),
            f"crash: the fleet is not Degraded naming {pod}",
        )
        expect(not record.worker(pod).reachable, f"crash: {pod} still reachable")
        expect(
            record.worker(survivor).plan_id == before.plan_id and record.worker(survivor).reachable,
            f"crash: {survivor} was affected",
        )
        self.say(
            f"Degraded ({degraded['reason']}): {degraded['message']}\n"
            f"Kubernetes would restart the pod; the demo starts {pod} again (a new process "
            "on a new port)."
        )
        await asyncio.to_thread(self.fleet.start_worker, pod)
        record = await self._settle("recover")
        expect(
            not record.condition("Degraded") and all(w.reachable for w in record.workers),
            "recover: the fleet did not recover",
        )
        self.say(f"Recovered: {record.conditions['Degraded']['message']}.")


def run_demo(options: DemoOptions, profile: ModelProfile, say: Say = print) -> DemoResult:
    """Start the workers, run the phases, stop the workers; the JSON record
    (`fleet-demo.json`) and the plot (`timeline.png`) go to `options.out`
    with the workers' logs, also when a phase fails or Ctrl-C stops it.
    `profile` is the served model's (`profile_for_model`)."""
    figures = demo_figures(profile, options.squeeze_ratio)
    options.out.mkdir(parents=True, exist_ok=True)
    dense = plan_id(PruningPlan.dense(profile.config.num_hidden_layers))
    say(
        f"elasticfleet local fleet demo: {options.workers} workers serving "
        f"{profile.model_name}, policy {options.policy}; output in {options.out}"
    )
    fleet = LocalFleet(options.model_dir, options.out, figures, options.workers, dense)
    demo = FleetDemo(fleet, profile, options, say)
    try:
        say(f"starting {options.workers} workers ...")
        fleet.start()
        for pod in fleet.pods:
            say(f"  {pod} listens on {fleet.workers[pod].address}")
        asyncio.run(demo.run())
    finally:
        fleet.stop()
        if demo.result.ticks:
            demo.result.write(options.out / RECORD_FILE)
            say(f"\nwrote {options.out / RECORD_FILE}")
            if importlib.util.find_spec("matplotlib") is None:
                say("no timeline plot: matplotlib is not installed (pip install matplotlib)")
            else:
                title = f"{profile.model_name}, policy {options.policy}"
                plot_timeline(demo.result.ticks, options.out / PLOT_FILE, title)
                say(f"wrote {options.out / PLOT_FILE}")
    return demo.result
