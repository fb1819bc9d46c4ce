"""`elasticfleet operator ...`: the operator's commands.

Kept apart from `cli.py` so the operator's commands grow in one place:
`add_operator_commands` adds the group and `OPERATOR_HANDLERS` maps each
subcommand to its function. `operator crds` prints the CustomResource-
Definitions that elasticfleet.operator.crds defines, the one source of the
CRD YAML (`elasticfleet operator crds | kubectl apply -f -`). `operator run`
runs the kopf operator; its settings come from flags, else the environment
(what a Deployment sets):

    ELASTICFLEET_NAMESPACES  comma-separated namespaces to serve (default: all)
    ELASTICFLEET_PEERING     kopf peering object name (several replicas: one active)
    ELASTICFLEET_LIVENESS    liveness endpoint, e.g. http://0.0.0.0:8080/healthz
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `operator crds | run` to the top-level subcommands."""
    operator = commands.add_parser("operator", help="the Kubernetes operator")
    group = operator.add_subparsers(dest="operator_command", required=True)
    group.add_parser("crds", help="print the ElasticFleet and AdapterSet CRDs as YAML")
    run = group.add_parser("run", help="run the operator (kopf) against the current cluster")
    run.add_argument(
        "--namespace",
        action="append",
        default=_env_list("ELASTICFLEET_NAMESPACES"),
        help="namespace to serve (repeatable; default: $ELASTICFLEET_NAMESPACES, else all)",
    )
    peering = run.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=os.environ.get("ELASTICFLEET_PEERING"),
        help="kopf peering name, so that one of several replicas is active",
    )
    peering.add_argument("--standalone", action="store_true", help="no peering (one replica)")
    run.add_argument(
        "--liveness",
        default=os.environ.get("ELASTICFLEET_LIVENESS"),
        help="liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz",
    )


def _env_list(name: str) -> list[str]:
    return [part for part in os.environ.get(name, "").split(",") if part]


def _crds(_args: argparse.Namespace) -> int:
    from elasticfleet.operator.crds import render_crds

    sys.stdout.write(render_crds())
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf

    import elasticfleet.operator.handlers  # noqa: F401 (registers the handlers)

    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone or args.peering is None,
            peering_name=args.peering,
            liveness_endpoint=args.liveness,
        )
    )
    return 0


OPERATOR_HANDLERS: dict[tuple[str, str], Handler] = {
    ("operator", "crds"): _crds,
    ("operator", "run"): _run,
}
