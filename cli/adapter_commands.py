"""`elasticfleet adapters ...`: manage AsymLoRA adapter sets in the Redis store.

Kept apart from `cli.py` so the adapter commands (and later `adapters train`)
grow in one place: `add_adapter_commands` adds the group and returns its
subparsers, and `ADAPTER_HANDLERS` maps each subcommand to its function.
Connection settings come from flags, else the environment, so a worker pod and
a person's shell can share one configuration:

    ELASTICFLEET_REDIS_URL       default redis://127.0.0.1:6379/0 (rediss:// for TLS)
    ELASTICFLEET_REDIS_PASSWORD  used when --password is not given
    ELASTICFLEET_REDIS_PREFIX    key prefix, default "elasticfleet:"

Exit codes: 0 success, 2 a problem to fix (unknown adapter, bad directory,
refused password, corrupt data), 75 (EX_TEMPFAIL) Redis unreachable: retry.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from elasticfleet.adapter_train import add_train_command, run_train

if TYPE_CHECKING:
    from elasticfleet.worker.adapters.store import AdapterStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
EXIT_TEMPFAIL = 75

Handler = Callable[[argparse.Namespace], int]


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
    return options


def add_adapter_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add `adapters push | list | pull | delete` to the main parser's commands."""
    adapters = commands.add_parser("adapters", help="AsymLoRA adapter sets in the Redis store")
    group = adapters.add_subparsers(dest="adapters_command", required=True)
    connection = redis_options()

    push = group.add_parser(
        "push",
        parents=[connection],
        help="publish an adapter directory (adapter.json + adapter.safetensors) as a new version",
    )
    push.add_argument("directory", type=Path)

    group.add_parser("list", parents=[connection], help="adapters and their versions, with sizes")

    pull = group.add_parser(
        "pull", parents=[connection], help="download a version into an adapter directory"
    )
    pull.add_argument("name")
    pull.add_argument("--version", type=int, help="version number (default: the current one)")
    pull.add_argument("directory", type=Path)

    delete = group.add_parser(
        "delete",
        parents=[connection],
        help="delete one version (not the current one) or, without --version, the whole adapter",
    )
    delete.add_argument("name")
    delete.add_argument("--version", type=int, help="the version to delete")
    add_train_command(group)
    return group


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
    from elasticfleet.worker.adapters.format import AdapterWeights

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
    summaries = open_store(args).list_adapters()
    if not summaries:
        print("no adapters")
        return 0
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
    return 0


@_reports_store_errors
def _pull(args: argparse.Namespace) -> int:
    manifest, weights = open_store(args).fetch(args.name, args.version)
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


ADAPTER_HANDLERS: dict[tuple[str, str], Handler] = {
    ("adapters", "push"): _push,
    ("adapters", "list"): _list,
    ("adapters", "pull"): _pull,
    ("adapters", "delete"): _delete,
    ("adapters", "train"): run_train,
}
