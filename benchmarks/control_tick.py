"""How long one fleet control tick takes over 10, 200 and 1000 workers.

Every worker is a real gRPC server on 127.0.0.1 in this process, answering
GetStats and ApplyPlan like a worker would (the tests' fake worker: memory
from the shared memory model). Each worker sees a different amount of device
memory held by other processes, so every worker gets its own budget and its
own policy decision. The controller is the operator's real FleetController
with the project's asyncio gRPC client.

- cold tick: a fresh controller, every worker gets a new plan pushed;
- steady tick: 10% of the workers' memory changed since the last tick.

Goal: p50 of a tick over 200 workers under 1 second, decisions and pushes
included.

    .venv/bin/python benchmarks/control_tick.py [--workers 10,200,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "operator"))
from fake_fleet import GIB, FakeWorker, RecordingSink, fake_worker_service

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.operator.control import (
    FleetController,
    WorkerEndpoint,
    plaintext_connect,
)
from elasticfleet.operator.spec import FleetSpec

RESULTS = Path(__file__).parent / "results"


def fleet_spec(policy: str) -> FleetSpec:
    return FleetSpec.parse(
        "bench",
        "default",
        {
            "model": {"name": "SmolLM2-135M-Instruct"},
            "worker": {"image": "elasticfleet/worker"},
            "memoryPolicy": {"policy": policy, "budget": {"fraction": 0.9}},
        },
    )


def squeeze(worker: FakeWorker, rng: random.Random) -> None:
    """Other processes hold a random 3.0-3.5 GiB of the worker's 4 GiB, so
    the budget (0.45-0.9 GiB) is below the dense model's needs for most
    workers and each one's plan depends on its own figure."""
    worker.others_bytes = int(rng.uniform(3.0, 3.5) * GIB)


async def measure(count: int, policy: str, repeats: int, seed: int) -> dict[str, Any]:
    profile = ModelProfile.load(DEFAULT_PROFILE)
    rng = random.Random(seed)
    workers = [
        FakeWorker(
            profile,
            batch_p90=rng.choice([1, 4, 8, 16]),
            sequence_p90=rng.choice([256, 1024, 2048]),
        )
        for _ in range(count)
    ]
    servers, endpoints = [], []
    for index, worker in enumerate(workers):
        squeeze(worker, rng)
        server = grpc.aio.server(handlers=[fake_worker_service(worker)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        endpoints.append(WorkerEndpoint(f"worker-{index}", f"127.0.0.1:{port}"))
    cold: list[float] = []
    steady: list[float] = []
    changed: list[int] = []
    try:
        for _ in range(repeats):
            controller = FleetController(fleet_spec(policy), profile, plaintext_connect)
            sink = RecordingSink()
            try:
                start = time.perf_counter()
                report = await controller.tick(endpoints, sink)
                cold.append(time.perf_counter() - start)
                failed = [o for o in report.outcomes if o.error_reason]
                if failed:
                    raise SystemExit(f"{len(failed)} workers failed: {failed[0].error}")
                for worker in rng.sample(workers, max(1, count // 10)):
                    squeeze(worker, rng)
                start = time.perf_counter()
                report = await controller.tick(endpoints, sink)
                steady.append(time.perf_counter() - start)
                changed.append(sum(o.changed for o in report.outcomes))
            finally:
                await controller.close()
    finally:
        await asyncio.gather(*(server.stop(None) for server in servers))
    row = {
        "workers": count,
        "policy": policy,
        "cold_p50_s": statistics.median(cold),
        "cold_max_s": max(cold),
        "steady_p50_s": statistics.median(steady),
        "steady_max_s": max(steady),
        "steady_plans_changed": statistics.median(changed),
        "load_average": os.getloadavg()[0],
    }
    print(row, flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Fleet control tick",
        "",
        "command: `.venv/bin/python benchmarks/control_tick.py`; every worker a gRPC server on "
        "127.0.0.1 in one process (2 CPUs shared); cold = every plan new, steady = 10% of "
        "workers' memory changed",
        "",
        "| workers | policy | cold p50 | cold max | steady p50 | steady max | plans changed "
        "(steady) | load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['policy']} | {r['cold_p50_s']:.3f} s | "
            f"{r['cold_max_s']:.3f} s | {r['steady_p50_s']:.3f} s | {r['steady_max_s']:.3f} s | "
            f"{r['steady_plans_changed']:.0f} | {r['load_average']:.1f} |"
        )
    goal = [r for r in rows if r["workers"] == 200]
    for r in goal:
        met = max(r["cold_p50_s"], r["steady_p50_s"]) < 1.0
        lines.append("")
        lines.append(
            f"- goal, 200 workers, {r['policy']}: p50 under 1 s: {met} "
            f"(cold {r['cold_p50_s']:.3f} s, steady {r['steady_p50_s']:.3f} s)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="10,200,1000")
    parser.add_argument("--policies", default="rl,greedy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [
        asyncio.run(measure(int(count), policy, args.repeats, args.seed))
        for policy in args.policies.split(",")
        for count in args.workers.split(",")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "control_tick.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "control_tick.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
