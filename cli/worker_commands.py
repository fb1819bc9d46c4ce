"""`elasticfleet worker` (serve a model over gRPC) and `elasticfleet generate`
(stream a completion from a running worker).

Secrets come from files or the environment, never from flags that `ps`
would show:

    --token-file FILE    bearer token (else $ELASTICFLEET_TOKEN); a worker
                         re-reads it when it changes (a rotated Secret), and
                         an empty one is refused, never read as "no token"

Exit codes: 0 success, 1 the worker refused the request, 2 a problem with
the arguments or the model, 75 (EX_TEMPFAIL) the worker is unavailable or
out of capacity: retry later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elasticfleet.cli.options import (
    EXIT_TEMPFAIL,
    Commands,
    bearer_token,
    layer_list,
    sampling_options,
    token_options,
)
from elasticfleet.worker.model.memory import SERVING_DTYPES
from elasticfleet.worker.serving.limits import MAX_THREADS

if TYPE_CHECKING:
    from elasticfleet.worker.adapters.cache import AdapterCache
    from elasticfleet.worker.serving.server import WorkerServer

# glibc's mallopt parameter for the mmap threshold (malloc.h's M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 65536


def register(commands: Commands) -> None:
    """Add `worker` and `generate`."""
    worker = commands.add_parser("worker", help="serve a model over gRPC (a fleet worker)")
    worker.set_defaults(handler=_worker)
    worker.add_argument(
        "--model", type=Path, help="model directory (default: the prepared SmolLM2 cache)"
    )
    worker.add_argument("--cache-dir", type=Path, help="cache root for the default model")
    worker.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)"
    )
    worker.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    worker.add_argument(
        "--metrics-host",
        help="address for /metrics (default: --host), e.g. 127.0.0.1 for a local scraper only",
    )
    worker.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="once serving, write JSON {host, port, metrics_port, pid} here (atomically; a "
        "stale file is removed at start-up and on shutdown): how a launcher learns the "
        "ports --port 0 and --metrics-port 0 picked",
    )
    budget = worker.add_mutually_exclusive_group()
    budget.add_argument("--budget-bytes", type=int, help="memory budget in bytes")
    budget.add_argument(
        "--budget-fraction",
        type=float,
        default=0.5,
        help="budget as a fraction of the device's free memory at start (default 0.5)",
    )
    worker.add_argument(
        "--dtype",
        choices=sorted(SERVING_DTYPES),
        default="fp32",
        help="serving dtype of weights, activations and the KV cache (default fp32; bf16 "
        "halves the bytes; fp16 where the device wants it)",
    )
    worker.add_argument("--max-batch", type=int, default=64, help="most sequences per step")
    worker.add_argument("--max-queue", type=int, default=256, help="most requests waiting")
    worker.add_argument("--default-max-new-tokens", type=int, default=256)
    worker.add_argument(
        "--prefill-group",
        type=int,
        default=4,
        help="while sequences run, newcomers wait until this many can share a prefill",
    )
    worker.add_argument(
        "--max-admit-delay",
        type=int,
        default=3,
        help="most decode steps a newcomer waits for a prefill group",
    )
    worker.add_argument(
        "--step-tokens",
        type=int,
        help="tokens one step computes, decode rows plus prompt chunks (chunked prefill; "
        "default 256)",
    )
    worker.add_argument(
        "--kv-growth-tokens",
        type=int,
        help="KV positions reserved ahead of each running sequence (admission's growth "
        "window; default 64)",
    )
    worker.add_argument("--drop-attention", type=layer_list, default=[], metavar="I,J")
    worker.add_argument("--drop-ffn", type=layer_list, default=[], metavar="I,J")
    worker.add_argument("--plan-id", default="initial", help="name of the starting plan")
    worker.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS)")
    worker.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    worker.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: require clients to present a certificate one of these CAs "
        "signed (mutual TLS; needs --tls-cert)",
    )
    worker.add_argument("--drain-timeout", type=float, default=30.0, help="seconds on shutdown")
    worker.add_argument(
        "--threads",
        type=_threads,
        help=f"torch threads, 1-{MAX_THREADS} (default: torch's choice)",
    )
    worker.add_argument(
        "--simulated-device",
        type=Path,
        metavar="FILE",
        help='report this device instead of the GPU or host: JSON {"total_bytes": T, '
        '"others_bytes": O}, re-read on every stats call (demos and tests without a GPU); '
        'with "caching_allocator": true, memory the worker frees stays its own until a '
        "plan switch releases it, as with a GPU's caching allocator",
    )
    store = worker.add_argument_group(
        "adapter store",
        "password: $ELASTICFLEET_REDIS_PASSWORD; key prefix: $ELASTICFLEET_REDIS_PREFIX",
    )
    store.add_argument(
        "--redis-url",
        help="serve adapters from this Redis (rediss:// for TLS; default: "
        "$ELASTICFLEET_REDIS_URL, else no adapters)",
    )
    store.add_argument("--redis-tls-ca", type=Path, help="CA bundle for a rediss:// server")
    store.add_argument(
        "--adapter-cache-bytes",
        type=int,
        default=256 << 20,
        help="bound of the local adapter cache (default: 256 MiB)",
    )
    token_options(worker)

    generate = commands.add_parser("generate", help="stream a completion from a running worker")
    generate.set_defaults(handler=_generate)
    generate.add_argument("prompt", help="the user message (wrapped in the chat template)")
    generate.add_argument("--target", required=True, help="the worker, HOST:PORT")
    sampling_options(generate)
    generate.add_argument("--adapter", help="adapter set to run with")
    generate.add_argument("--task", help="the adapter's task head (default: router mixing)")
    generate.add_argument("--request-id", default="", help="identifier for the worker's logs")
    generate.add_argument("--timeout", type=float, help="deadline in seconds")
    generate.add_argument("--tls", action="store_true", help="connect with TLS")
    generate.add_argument("--tls-ca", type=Path, help="PEM roots to verify the worker with")
    generate.add_argument(
        "--tls-client-cert", type=Path, help="PEM client certificate, for mutual TLS"
    )
    generate.add_argument("--tls-client-key", type=Path, help="its private key")
    token_options(generate)


def _threads(text: str) -> int:
    """--threads, refused beyond MAX_THREADS (torch would crash on it)."""
    threads = int(text)
    if not 1 <= threads <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_THREADS}, got {threads}")
    return threads


def _limit_heap_retention() -> bool:
    """Serve every allocation of 64 KiB or more from its own mmap, as
    MALLOC_MMAP_THRESHOLD_=65536 would. glibc otherwise raises the threshold
    after large frees, so freed KV cache would stay in the heap and the
    process would keep memory the worker has given back to its budget."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def _worker(args: argparse.Namespace) -> int:
    import torch

    from elasticfleet.worker.adapters.host import CachedAdapterHost
    from elasticfleet.worker.model.generation import load_tokenizer
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.plan import PruningPlan
    from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model
    from elasticfleet.worker.serving.admission import Admission
    from elasticfleet.worker.serving.engine import Engine
    from elasticfleet.worker.serving.readiness import remove_ready_file
    from elasticfleet.worker.serving.server import ServerOptions, WorkerServer, server_tls
    from elasticfleet.worker.serving.telemetry import open_device

    try:
        if args.ready_file is not None:  # before the model loads: none may say "ready" till then
            remove_ready_file(args.ready_file)
        device = open_device(args.simulated_device)
        memory = device.read(allocated_bytes=0)  # before the model loads
        # Credentials are checked before the model loads, to fail in one line and at once.
        token = bearer_token(args)
        server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as error:
        print(f"elasticfleet: error: {error}", file=sys.stderr)
        return 2
    _limit_heap_retention()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget_bytes or int(args.budget_fraction * memory.free_bytes)
    path = args.model or prepare_model(args.cache_dir, progress=False)
    model = ElasticLlama.from_pretrained(path, dtype=getattr(torch, SERVING_DTYPES[args.dtype]))
    layers = model.config.num_hidden_layers
    plan = PruningPlan.from_dropped(layers, args.drop_attention, args.drop_ffn)
    if args.budget_bytes is None:  # the device set the budget: start with what fits it
        fitted = Admission(model.config, model.dtype, budget, args.max_batch).start_plan(plan)
        if fitted is not None and fitted != plan:
            print(
                f"elasticfleet worker: the device leaves a budget of {budget} bytes, too small "
                f"for the plan's weights: starting with the deepest blocks dropped "
                f"({fitted.describe()}) until a plan arrives",
                file=sys.stderr,
            )
            plan = fitted
    model.apply_plan(plan)
    adapters = CachedAdapterHost(_adapter_cache(args), model.config, model.plan)
    # Left out when not given, so the engine's defaults (which import torch) hold.
    tuning = {
        name: value
        for name, value in (
            ("step_tokens", args.step_tokens),
            ("kv_growth_tokens", args.kv_growth_tokens),
        )
        if value is not None
    }
    engine = Engine(
        model,
        load_tokenizer(path),
        budget_bytes=budget,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        plan_id=args.plan_id,
        prefill_group=args.prefill_group,
        max_admit_delay=args.max_admit_delay,
        adapters=adapters,
        device=device,
        **tuning,
    )
    options = ServerOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        model_name=args.model.name if args.model else MODEL_NAME,
        token=token,
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        default_max_new_tokens=args.default_max_new_tokens,
        drain_timeout_s=args.drain_timeout,
    )
    server = WorkerServer(engine, options)
    return asyncio.run(_serve(server, budget, memory.detail, args.ready_file))


def _adapter_cache(args: argparse.Namespace) -> AdapterCache | None:
    """The local cache over the Redis store the flags or environment name;
    None when no store is configured (the worker then serves no adapters)."""
    from elasticfleet.worker.adapters.cache import AdapterCache
    from elasticfleet.worker.adapters.store import AdapterStore

    tls_ca = str(args.redis_tls_ca) if args.redis_tls_ca else None
    store = AdapterStore.from_environment(args.redis_url, tls_ca=tls_ca)
    if store is None:
        return None
    return AdapterCache(store, args.adapter_cache_bytes)


async def _serve(server: WorkerServer, budget: int, device: str, ready_file: Path | None) -> int:
    """Serve until SIGTERM or SIGINT, then drain. Once both servers listen,
    say so to people on stderr and to the launcher in `ready_file`."""
    from elasticfleet.worker.serving.readiness import WorkerReady, write_ready_file

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    options = server.options
    metrics_port = None if server.metrics is None else server.metrics.port
    metrics_host = options.metrics_host or options.host
    metrics = "" if metrics_port is None else f", metrics on {metrics_host}:{metrics_port}"
    print(
        f"elasticfleet worker listening on {options.host}:{server.port}{metrics}; "
        f"budget {budget / 2**20:.0f} MiB ({device})",
        file=sys.stderr,
        flush=True,
    )
    if ready_file is not None:
        ready = WorkerReady(options.host, server.port, metrics_port, os.getpid())
        write_ready_file(ready_file, ready)
    await stop.wait()
    if ready_file is not None:
        # It takes no more requests; failing to say so must not stop the drain.
        with contextlib.suppress(OSError):
            ready_file.unlink(missing_ok=True)
    print("draining...", file=sys.stderr, flush=True)
    drained = await server.stop()
    return 0 if drained else 1


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from elasticfleet.worker.serving.client import FINISH_NAMES, WorkerClient, generate_request
    from elasticfleet.worker.serving.credentials import ClientTls

    request = generate_request(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat_template=not args.raw,
        request_id=args.request_id,
        adapter=args.adapter,
        task=args.task,
    )
    files = (args.tls_ca, args.tls_client_cert, args.tls_client_key)
    tls = ClientTls.from_files(*files) if args.tls or any(files) else False
    token = bearer_token(args)
    with WorkerClient(args.target, token=token, tls=tls) as client:
        tokens, finish, plans = 0, "", set()
        try:
            for message in client.generate(request, timeout=args.timeout):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                tokens += len(message.token_ids)
                finish = FINISH_NAMES[message.finish_reason]
                plans.add(message.plan_id)
        except grpc.RpcError as raised:
            error: Any = raised  # a grpc.Call too: it has the status
            code: grpc.StatusCode = error.code()
            details: str = error.details()
            print(f"\nelasticfleet: error: {code.name}: {details}", file=sys.stderr)
            retry = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return EXIT_TEMPFAIL if code in retry else 1
    plan = ", ".join(sorted(plans))
    print(f"\n[{tokens} tokens, finish: {finish}, plan: {plan}]", file=sys.stderr)
    return 0
