"""What several command groups share: the shape of a group, flags that mean
the same everywhere, and exit codes.

Every command module (`*_commands.py`) has one `register(commands)` that
adds its group to the main parser and sets each leaf parser's `handler`, a
function from the parsed arguments to an exit code; `main` calls it. Heavy
imports (torch, grpc, kopf) happen inside handlers, so `--help` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from elasticfleet.worker.serving.credentials import read_token_file

#: The main parser's subcommands, which each group's `register` adds to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: A leaf command: parsed arguments in, exit code out.
Handler = Callable[[argparse.Namespace], int]

#: sysexits' EX_TEMPFAIL: a service is unavailable or busy; retry later.
EXIT_TEMPFAIL = 75


def command_group(commands: Commands, name: str, help: str) -> Commands:
    """Add the command `name`, whose subcommands are required: the
    subparsers a group module adds its leaf commands to."""
    parser = commands.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: user cache dir)")


def no_progress_option(parser: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    parser.add_argument("--no-progress", action="store_true", help=what)


def layer_list(text: str) -> list[int]:
    """Parse "3,7,12" (the --drop-attention/--drop-ffn flags of several commands)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 3,7,12, got {text!r}"
        ) from None


def sampling_options(parser: argparse.ArgumentParser) -> None:
    """How a completion is sampled: the flags of both `generate` commands."""
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--raw", action="store_true", help="send the prompt without chat template")


def token_options(parser: argparse.ArgumentParser) -> None:
    """The bearer token: from a file or the environment, never a flag `ps` shows."""
    parser.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: $ELASTICFLEET_TOKEN, else none)",
    )


def bearer_token(args: argparse.Namespace) -> str | None:
    """The bearer token, without surrounding whitespace wherever it comes
    from (a Secret made from a file keeps its last newline; the operator
    strips it too). A --token-file that is unreadable or holds no token is
    an argument error (ValueError): an empty one must not quietly mean "no
    authentication"."""
    if args.token_file is not None:
        try:
            return read_token_file(args.token_file)
        except ValueError as error:
            raise ValueError(f"--token-file {args.token_file}: {error}") from None
    return os.environ.get("ELASTICFLEET_TOKEN", "").strip() or None
