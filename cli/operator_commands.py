"""`elasticfleet operator ...`: the operator's commands.

`operator crds` prints the CustomResource-
Definitions that elasticfleet.operator.crds defines, the one source of the
CRD YAML (`elasticfleet operator crds | kubectl apply -f -`). `operator loop`
drives the fleet control loop against workers given by address, without
Kubernetes (a local demo, or a look at what the operator would do).
`operator run` runs the kopf operator; its settings come from flags, else
the environment (what a Deployment sets):

    ELASTICFLEET_NAMESPACES  comma-separated namespaces to serve (default: all)
    ELASTICFLEET_PEERING     kopf peering object name (several replicas: one active)
    ELASTICFLEET_PRIORITY    this replica's peering priority (default: drawn at random)
    ELASTICFLEET_LIVENESS    liveness endpoint, e.g. http://0.0.0.0:8080/healthz
    ELASTICFLEET_METRICS_PORT  port of the operator's Prometheus /metrics (the control
                             loop's elasticfleet_operator_* figures, operator/metrics.py,
                             and the process's)

and the default adapter store handed to fleets in the operator's namespace
(elasticfleet.operator.spec.DefaultStore): ELASTICFLEET_REDIS_URL, _PREFIX,
ELASTICFLEET_REDIS_PASSWORD_SECRET (and _KEY), ELASTICFLEET_OPERATOR_NAMESPACE.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from elasticfleet.cli.options import Commands, bearer_token, command_group, token_options

if TYPE_CHECKING:
    from elasticfleet.operator.control import FleetEvent, WorkerEndpoint
    from elasticfleet.operator.status import FleetStatus


def register(commands: Commands) -> None:
    """Add `operator crds | loop | run`."""
    group = command_group(commands, "operator", "the Kubernetes operator")
    crds = group.add_parser("crds", help="print the ElasticFleet and AdapterSet CRDs as YAML")
    crds.add_argument(
        "--peering",
        metavar="NAME",
        help="also kopf's peering CRDs and the peering object NAME (for `run --peering NAME`)",
    )
    crds.add_argument(
        "--namespace",
        action="append",
        help="with --peering: a namespace the operator serves (repeatable; default: "
        "$ELASTICFLEET_NAMESPACES, as for `run`, else all: one ClusterKopfPeering)",
    )
    crds.set_defaults(handler=_crds)
    loop = group.add_parser(
        "loop", help="run the fleet control loop against workers by address (no Kubernetes)"
    )
    loop.add_argument("fleet", type=Path, help="an ElasticFleet YAML file (its spec is used)")
    loop.add_argument(
        "--worker",
        action="append",
        required=True,
        type=_endpoint,
        metavar="NAME=HOST:PORT",
        help="a worker to plan (repeatable)",
    )
    loop.add_argument("--ticks", type=int, default=1, help="ticks to run (default 1)")
    loop.add_argument("--interval", type=float, help="seconds between ticks (default: the spec's)")
    token_options(loop)
    loop.set_defaults(handler=_loop)
    run = group.add_parser("run", help="run the operator (kopf) against the current cluster")
    run.add_argument(
        "--namespace",
        action="append",
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
        "--priority",
        type=int,
        help="peering priority: the live replica with the highest is active (default: "
        "$ELASTICFLEET_PRIORITY, else drawn at random, as replicas of equal priority all pause)",
    )
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    verbosity.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    run.add_argument(
        "--log-format",
        choices=("full", "plain", "json"),
        default="full",
        help="log lines with timestamps and levels (full), bare (plain) or as JSON",
    )
    run.add_argument(
        "--liveness",
        default=os.environ.get("ELASTICFLEET_LIVENESS"),
        help="liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        # argparse converts a string default with `type`, so a bad value is an error.
        default=os.environ.get("ELASTICFLEET_METRICS_PORT") or None,
        help="serve Prometheus /metrics (the control loop's and the process's figures) on this "
        "port, on every interface",
    )
    run.set_defaults(handler=_run)


def _env_list(name: str) -> list[str]:
    return [part for part in os.environ.get(name, "").split(",") if part]


def namespaces(args: argparse.Namespace) -> list[str]:
    """The namespaces `operator run` serves: flags, else the environment."""
    return list(args.namespace or _env_list("ELASTICFLEET_NAMESPACES"))


def peering_priority(args: argparse.Namespace, standalone: bool) -> int:
    """This replica's priority: the flag, else $ELASTICFLEET_PRIORITY, else
    (peering) a random one. Replicas of one Deployment share their settings
    and kopf pauses every replica that ties, so each draws its own."""
    if args.priority is not None:
        return int(args.priority)
    value = os.environ.get("ELASTICFLEET_PRIORITY")
    if value:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"ELASTICFLEET_PRIORITY must be an integer, got {value!r}") from None
    return 0 if standalone else random.randint(1, 2**31 - 1)


def _endpoint(text: str) -> WorkerEndpoint:
    from elasticfleet.operator.control import WorkerEndpoint

    name, sep, address = text.partition("=")
    if not sep or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return WorkerEndpoint(name, address)


class _PrintingSink:
    """Events to stderr as they happen; the last status kept for stdout."""

    def __init__(self) -> None:
        self.status: FleetStatus | None = None

    async def patch_status(self, status: FleetStatus) -> None:
        self.status = status

    async def post_event(self, event: FleetEvent) -> None:
        print(f"{event.type} {event.reason}: {event.message}", file=sys.stderr, flush=True)


def _loop(args: argparse.Namespace) -> int:
    import yaml

    from elasticfleet.operator.control import AdapterWant, FleetController, profile_for_model
    from elasticfleet.operator.fleet_access import Credentials
    from elasticfleet.operator.spec import FleetSpec

    body = yaml.safe_load(args.fleet.read_text())
    meta = body.get("metadata", {})
    spec = FleetSpec.parse(
        meta.get("name", "fleet"), meta.get("namespace", "default"), body["spec"]
    )
    interval = spec.memory.plan_interval_s if args.interval is None else args.interval
    sink = _PrintingSink()

    # Without AdapterSet objects, each adapter set is loaded by its name.
    adapters = [AdapterWant(name) for name in spec.adapters]

    async def run() -> None:
        controller = FleetController(
            spec,
            profile_for_model(spec.model_name),
            Credentials(token=bearer_token(args)).connect(),
        )
        try:
            for tick in range(args.ticks):
                if tick:
                    await asyncio.sleep(interval)
                await controller.tick(args.worker, sink, adapters)
        finally:
            await controller.close()

    asyncio.run(run())
    status = {} if sink.status is None else sink.status.to_dict()
    sys.stdout.write(yaml.safe_dump({"status": status}, sort_keys=False))
    return 0


def _crds(args: argparse.Namespace) -> int:
    from elasticfleet.operator.crds import render_crds

    sys.stdout.write(render_crds(args.peering, namespaces(args)))
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf

    import elasticfleet.operator.handlers  # noqa: F401 (registers the handlers)

    served = namespaces(args)
    standalone = args.standalone or args.peering is None
    try:
        priority = peering_priority(args, standalone)
    except ValueError as error:
        print(f"elasticfleet: error: {error}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    log_format = kopf.LogFormat[args.log_format.upper()]
    kopf.configure(verbose=args.verbose, quiet=args.quiet, log_format=log_format)
    asyncio.run(
        kopf.operator(
            clusterwide=not served,
            namespaces=served,
            standalone=standalone,
            peering_name=args.peering,
            priority=priority,
            liveness_endpoint=args.liveness,
        )
    )
    return 0
