"""The `elasticfleet` command line: one parser, a group of subcommands per
module. Subcommands stay thin: they parse arguments and call library
functions (cli/options.py says what every group module looks like)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from elasticfleet.cli import (
    adapter_commands,
    agent_commands,
    corpus_commands,
    fleet_commands,
    gateway_commands,
    model_commands,
    operator_commands,
    worker_commands,
)

#: In the order `elasticfleet --help` lists them.
GROUPS = (
    model_commands,
    corpus_commands,
    agent_commands,
    adapter_commands,
    worker_commands,
    operator_commands,
    fleet_commands,
    gateway_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasticfleet",
        description="Memory-elastic LLM fleets: the operator, workers and tools.",
    )
    version = importlib.metadata.version("elasticfleet")
    parser.add_argument("--version", action="version", version=f"elasticfleet {version}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # corpus_sources, not corpus: the corpus module loads torch, and commands
    # that need none (`operator crds`, any --help) must start without it.
    # integrity, not prepare (which loads gguf and tokenizers): the operator's
    # image has neither, nor torch.
    from elasticfleet.agent.corpus_sources import CorpusError
    from elasticfleet.worker.model.integrity import ModelPrepareError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (ModelPrepareError, CorpusError, ValueError) as error:
        print(f"elasticfleet: error: {error}", file=sys.stderr)
        return 2
    return code
