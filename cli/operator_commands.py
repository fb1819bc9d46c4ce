"""`elasticfleet operator ...`: the operator's commands.

Kept apart from `cli.py` so the operator's commands grow in one place:
`add_operator_commands` adds the group and `OPERATOR_HANDLERS` maps each
subcommand to its function. `operator crds` prints the CustomResource-
Definitions that elasticfleet.operator.crds defines, the one source of the
CRD YAML (`elasticfleet operator crds | kubectl apply -f -`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `operator crds` to the top-level subcommands."""
    operator = commands.add_parser("operator", help="the Kubernetes operator")
    group = operator.add_subparsers(dest="operator_command", required=True)
    group.add_parser("crds", help="print the ElasticFleet and AdapterSet CRDs as YAML")


def _crds(_args: argparse.Namespace) -> int:
    from elasticfleet.operator.crds import render_crds

    sys.stdout.write(render_crds())
    return 0


OPERATOR_HANDLERS: dict[tuple[str, str], Handler] = {
    ("operator", "crds"): _crds,
}
