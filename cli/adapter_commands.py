"""`elasticfleet adapters ...`: manage AsymLoRA adapter sets in the Redis store.

`adapters train` fine-tunes an AsymLoRA set on SmolLM2 over tasks drawn from
the offline corpus (elasticfleet.agent.tasks) and writes an adapter
directory: adapter.json and adapter.safetensors (the set, what `adapters
push` publishes) plus training.json (the run: loss curve, per-task held-out
perplexity with and without the adapter, the command that reproduces it).
The store commands' connection settings come from flags, else the environment, so a worker pod and
a person's shell can share one configuration:

    ELASTICFLEET_REDIS_URL       default redis://127.0.0.1:6379/0 (rediss:// for TLS)
    ELASTICFLEET_REDIS_PASSWORD  used when --password is not given
    ELASTICFLEET_REDIS_PREFIX    key prefix, default "elasticfleet:"

Exit codes: 0 success, 2 a problem to fix (unknown adapter, bad directory,
refused password, corrupt data), 75 (EX_TEMPFAIL) Redis unreachable: retry.
A command gives up on a Redis that does not answer within --timeout seconds
(plus 3 s to connect), so a stalled Redis is exit 75 in about 18 s, not minutes.

`adapters gc` sweeps the blobs no manifest names, which an interrupted push
or delete leaves behind. It is a dry run unless given --delete, because
deleting is irreversible and a wrong --prefix or --redis-url would otherwise
sweep the wrong store: look first, then delete. Run it after a push that
failed or was killed, or on a schedule (say daily): it never races a push in
progress (see AdapterStore.collect_garbage) and never touches a blob a
manifest names, so it is safe at any time.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from elasticfleet.cli.options import (
    EXIT_TEMPFAIL,
    Commands,
    Handler,
    cache_dir_option,
    command_group,
)

if TYPE_CHECKING:
    from elasticfleet.worker.adapters.store import AdapterStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TASKS = ("code", "qa", "definitions")
TRAINING_REPORT = "training.json"


def redis_options() -> argparse.ArgumentParser:
    """The connection flags, as a parent parser every store command shares."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("Redis connection")
    group.add_argument(
        "--redis-url",
        help="redis:// or rediss:// (TLS) URL "
        f"(default: $ELASTICFLEET_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    group.add_argument(
        "--password", help="Redis password (default: $ELASTICFLEET_REDIS_PASSWORD, else the URL's)"
    )
    group.add_argument(
        "--prefix", help="key prefix (default: $ELASTICFLEET_REDIS_PREFIX, else 'elasticfleet:')"
    )
    group.add_argument("--tls-ca", help="CA bundle that signed the server's certificate")
    group.add_argument("--tls-cert", help="client certificate, for servers that require one")
    group.add_argument("--tls-key", help="the client certificate's private key")
    group.add_argument(
        "--tls-insecure",
        action="store_true",
        help="do not verify the server's certificate (testing only)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=15.0,
        help="seconds to wait for each Redis reply (default: 15); a stalled Redis fails the "
        "command with exit 75 within this plus 3 s to connect",
    )
    return options


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def register(commands: Commands) -> None:
    """Add `adapters push | list | pull | delete | gc | train`."""
    group = command_group(commands, "adapters", "AsymLoRA adapter sets in the Redis store")
    connection = redis_options()

    push = group.add_parser(
        "push",
        parents=[connection],
        help="publish an adapter directory (adapter.json + adapter.safetensors) as a new version",
    )
    push.add_argument("directory", type=Path)
    push.set_defaults(handler=_push)

    listing = group.add_parser(
        "list", parents=[connection], help="adapters and their versions, with sizes"
    )
    listing.set_defaults(handler=_list)

    pull = group.add_parser(
        "pull", parents=[connection], help="download a version into an adapter directory"
    )
    pull.add_argument("name")
    pull.add_argument("--version", type=int, help="version number (default: the current one)")
    pull.add_argument("directory", type=Path)
    pull.set_defaults(handler=_pull)

    delete = group.add_parser(
        "delete",
        parents=[connection],
        help="delete one version (not the current one) or, without --version, the whole adapter",
    )
    delete.add_argument("name")
    delete.add_argument("--version", type=int, help="the version to delete")
    delete.set_defaults(handler=_delete)

    gc = group.add_parser(
        "gc",
        parents=[connection],
        help="find blobs no manifest names (left by interrupted pushes); --delete removes them",
    )
    gc.add_argument(
        "--grace",
        type=_seconds,
        help="only blobs untouched this many seconds (default: 3600, far longer than a push)",
    )
    gc.add_argument(
        "--delete", action="store_true", help="remove them (without it: a dry run, nothing changes)"
    )
    gc.set_defaults(handler=_gc)
    _add_train(group)


def _add_train(group: Commands) -> None:
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
    cache_dir_option(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)


def open_store(args: argparse.Namespace) -> AdapterStore:
    """The store the connection flags (or environment) describe."""
    from elasticfleet.worker.adapters.store import AdapterStore

    store = AdapterStore.from_environment(
        args.redis_url,
        password=args.password,
        prefix=args.prefix,
        default_url=DEFAULT_REDIS_URL,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_verify=not args.tls_insecure,
        timeout_s=args.timeout,
    )
    assert store is not None  # there is a default URL
    return store


def _reports_store_errors(handler: Handler) -> Handler:
    """Print store errors as one line and choose the exit code: 75 when
    Redis is unreachable (a script may retry), 2 otherwise."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from elasticfleet.worker.adapters.store import AdapterStoreError, StoreUnavailable

        try:
            return handler(args)
        except (AdapterStoreError, FileNotFoundError) as error:
            print(f"elasticfleet: error: {error}", file=sys.stderr)
            return EXIT_TEMPFAIL if isinstance(error, StoreUnavailable) else 2

    return run


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


@_reports_store_errors
def _push(args: argparse.Namespace) -> int:
    from elasticfleet.worker.adapters.weights import AdapterWeights

    weights = AdapterWeights.load(args.directory)
    store = open_store(args)
    manifest = store.publish(weights)
    current = store.current_version(manifest.name)
    print(
        f"pushed {manifest.name} version {manifest.version}: {len(manifest.parts)} parts, "
        f"{_mib(manifest.total_bytes)} (current version: {current})"
    )
    return 0


@_reports_store_errors
def _list(args: argparse.Namespace) -> int:
    """The table of readable versions; what could not be read goes to
    stderr, one line each, and makes the exit code 2."""
    summaries = open_store(args).list_adapters()
    problems = [problem for summary in summaries for problem in summary.problems]
    for problem in problems:
        print(f"elasticfleet: error: {problem}", file=sys.stderr)
    if not any(summary.versions for summary in summaries):
        print("no adapters" if not problems else "no readable adapters")
        return 2 if problems else 0
    rows = [("NAME", "VERSION", "CURRENT", "SIZE", "PARTS", "BASE MODEL", "TASKS", "CREATED")]
    for summary in summaries:
        for m in summary.versions:
            rows.append(
                (
                    m.name,
                    str(m.version),
                    "*" if m.version == summary.current else "",
                    _mib(m.total_bytes),
                    str(len(m.parts)),
                    m.spec.base_model,
                    ",".join(m.spec.tasks) + (" +router" if m.spec.router else ""),
                    m.created,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 2 if problems else 0


@_reports_store_errors
def _pull(args: argparse.Namespace) -> int:
    from elasticfleet.worker.adapters.weights import fetch

    manifest, weights = fetch(open_store(args), args.name, args.version)
    path = weights.save(args.directory)
    print(
        f"pulled {manifest.name} version {manifest.version} "
        f"({_mib(manifest.total_bytes)}) to {path}"
    )
    return 0


@_reports_store_errors
def _delete(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.version is not None:
        manifest = store.delete_version(args.name, args.version)
        print(f"deleted {args.name} version {manifest.version} ({_mib(manifest.total_bytes)})")
    else:
        versions = store.delete_adapter(args.name)
        print(f"deleted {args.name} (versions {', '.join(map(str, versions))})")
    return 0


@_reports_store_errors
def _gc(args: argparse.Namespace) -> int:
    from elasticfleet.worker.adapters.store import GC_GRACE_S

    grace = GC_GRACE_S if args.grace is None else args.grace
    report = open_store(args).collect_garbage(grace_s=grace, delete=args.delete)
    versions = ", ".join(f"{name} version {version}" for name, version in report.versions)
    young = f"; {report.young} younger than {grace:g} s kept" if report.young else ""
    found = f"{report.blobs} unreferenced blobs (about {_mib(report.bytes)}) of {versions}{young}"
    if not report.blobs:
        print(f"no unreferenced blobs older than {grace:g} s{young}")
    elif report.deleted:
        print(f"deleted {found}")
    else:
        print(f"found {found}\ndry run: nothing was deleted; run again with --delete to delete")
    return 0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _train(args: argparse.Namespace) -> int:
    from elasticfleet.agent.tasks import corpus_tasks
    from elasticfleet.worker.adapters.names import ALL_MODULES
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
