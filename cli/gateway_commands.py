"""`elasticfleet gateway`: one HTTP (TGI and OpenAI APIs) and gRPC endpoint
in front of a fleet's workers (elasticfleet.gateway).

Where it learns the workers, one of:

    --worker NAME=HOST:PORT   fixed workers (repeatable): a fleet on this machine
    --workers-dns HOST:PORT   every address HOST resolves to, re-resolved every
                              --discover-seconds: a fleet's headless worker
                              Service, which lists its ready pods (how the
                              operator deploys the gateway; no API access)
    --fleet NAME              the workers in ElasticFleet NAME's status
                              (--namespace), read from the API server with the
                              kubeconfig or the pod's service account

Whichever it is, every worker is asked GetStats and ListAdapters every
--refresh-seconds (0.5 by default), so what routing sees is never more
than a second old, and a worker that stops answering is out within a second.

Secrets come from files or the environment, never flags: the gateway's own
bearer token (--token-file, else $ELASTICFLEET_GATEWAY_TOKEN; none: no
authentication) and the workers' (--worker-token-file, else
$ELASTICFLEET_TOKEN, as every other command). Token files are re-read when
they change. Exit codes: 0 stopped by SIGTERM or SIGINT, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elasticfleet.cli.options import Commands

if TYPE_CHECKING:
    from elasticfleet.gateway.server import Gateway
    from elasticfleet.gateway.sources import Workers, WorkerSource

GATEWAY_TOKEN_ENV = "ELASTICFLEET_GATEWAY_TOKEN"
WORKER_TOKEN_ENV = "ELASTICFLEET_TOKEN"


def register(commands: Commands) -> None:
    """Add `gateway`."""
    gateway = commands.add_parser(
        "gateway", help="serve a fleet behind TGI- and OpenAI-compatible HTTP APIs and gRPC"
    )
    gateway.set_defaults(handler=_gateway)
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gateway.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    gateway.add_argument(
        "--grpc-port",
        type=int,
        default=50052,
        help="gRPC port for Worker/Generate passthrough (0: any free port; -1: none)",
    )
    workers = gateway.add_argument_group("workers (one of)")
    workers.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a worker (repeatable)",
    )
    workers.add_argument(
        "--workers-dns", metavar="HOST:PORT", help="every address HOST resolves to, at PORT"
    )
    workers.add_argument("--fleet", metavar="NAME", help="the workers of this ElasticFleet")
    gateway.add_argument("--namespace", default="default", help="the --fleet's namespace")
    gateway.add_argument(
        "--discover-seconds",
        type=float,
        default=5.0,
        help="how often --workers-dns or --fleet is asked again (default 5)",
    )
    gateway.add_argument(
        "--refresh-seconds",
        type=float,
        default=0.5,
        help="how often every worker is asked GetStats (default 0.5; at most 1)",
    )
    gateway.add_argument(
        "--model-name", default="", help="the base model's name (default: as workers report)"
    )
    gateway.add_argument(
        "--max-wait",
        type=float,
        default=10.0,
        help="seconds a request waits for a worker that can take it (default 10)",
    )
    gateway.add_argument(
        "--max-waiting", type=int, default=256, help="requests waiting at once, at most"
    )
    gateway.add_argument(
        "--max-streams-per-worker",
        type=int,
        default=64,
        help="the gateway's open streams per worker, at most (default 64)",
    )
    gateway.add_argument(
        "--token-file", type=Path, help=f"the gateway's token (else ${GATEWAY_TOKEN_ENV})"
    )
    gateway.add_argument(
        "--worker-token-file", type=Path, help=f"the workers' token (else ${WORKER_TOKEN_ENV})"
    )
    gateway.add_argument("--worker-tls-ca", type=Path, help="PEM roots: reach workers over TLS")
    gateway.add_argument(
        "--worker-tls-cert",
        type=Path,
        help="client certificate (PEM) for workers that require one (--tls-client-ca)",
    )
    gateway.add_argument("--worker-tls-key", type=Path, help="the client certificate's key")
    gateway.add_argument(
        "--worker-server-name-suffix",
        metavar="SUFFIX",
        help="verify a worker at IP a.b.c.d as a-b-c-d.SUFFIX (e.g. <fleet>-worker.<ns>.svc)",
    )


def _token(path: Path | None, variable: str, flag: str) -> Callable[[], str | None]:
    """The token source: a file re-read when it changes, else the variable."""
    from elasticfleet.worker.serving.credentials import TokenFile

    if path is not None:
        try:
            return TokenFile(path).current
        except ValueError as error:
            raise ValueError(f"{flag} {path}: {error}") from None
    fixed = os.environ.get(variable, "").strip() or None
    return lambda: fixed


def workers_from_fleet(fleet: dict[str, Any] | None) -> Workers:
    """The workers an ElasticFleet's status names (pod -> address)."""
    from elasticfleet.operator.status import FleetStatus

    if fleet is None:
        return {}
    status = FleetStatus.from_dict(fleet.get("status") or {})
    return {worker.pod: worker.address for worker in status.workers or () if worker.address}


def _fleet_source(name: str, namespace: str, interval_s: float) -> WorkerSource:
    """Fleet `name`'s workers from its status, as the operator last saw them."""
    import kopf

    from elasticfleet.gateway.sources import WorkerSource
    from elasticfleet.operator.crds import API_VERSION, FLEET_PLURAL
    from elasticfleet.operator.kube import KubeApi

    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise ValueError("--fleet: no kubeconfig and no service account to reach the API with")
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/{FLEET_PLURAL}/{name}"
    apis: list[KubeApi] = []

    async def fetch() -> Workers:
        if not apis:  # its session needs the running loop
            apis.append(KubeApi(info))
        return workers_from_fleet(await apis[0].get(path))

    async def close() -> None:
        for api in apis:
            await api.close()

    return WorkerSource(fetch, interval_s, f"ElasticFleet {namespace}/{name}", close)


def _source(args: argparse.Namespace) -> WorkerSource:
    from elasticfleet.gateway.sources import dns_workers, parse_worker_flag, static_workers

    given = [bool(args.worker), bool(args.workers_dns), bool(args.fleet)]
    if sum(given) != 1:
        raise ValueError("give the workers one way: --worker, --workers-dns or --fleet")
    if args.worker:
        return static_workers(dict(parse_worker_flag(text) for text in args.worker))
    if args.workers_dns:
        host, _, port = args.workers_dns.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--workers-dns {args.workers_dns!r}: expected HOST:PORT")
        return dns_workers(host, int(port), args.discover_seconds)
    return _fleet_source(args.fleet, args.namespace, args.discover_seconds)


def _gateway(args: argparse.Namespace) -> int:
    from elasticfleet.gateway.pool import PlanRatios, PoolOptions
    from elasticfleet.gateway.server import Gateway, GatewayOptions
    from elasticfleet.operator.control import profile_for_model
    from elasticfleet.worker.serving.credentials import ClientTls

    if not 0 < args.refresh_seconds <= 1:
        raise ValueError("--refresh-seconds must be in (0, 1]: views are at most a second old")
    if args.worker_tls_ca is None and (args.worker_tls_cert or args.worker_tls_key):
        raise ValueError("--worker-tls-cert and --worker-tls-key need --worker-tls-ca")
    tls = (
        None
        if args.worker_tls_ca is None
        else ClientTls.from_files(args.worker_tls_ca, args.worker_tls_cert, args.worker_tls_key)
    )
    options = GatewayOptions(
        host=args.host,
        port=args.port,
        grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        model_name=args.model_name,
        pool=PoolOptions(
            refresh_s=args.refresh_seconds,
            max_wait_s=args.max_wait,
            max_waiting=args.max_waiting,
            max_streams=args.max_streams_per_worker,
            tls=tls,
            server_name_suffix=args.worker_server_name_suffix,
        ),
    )
    gateway = Gateway(
        _source(args),
        PlanRatios(profile_for_model),
        options,
        token=_token(args.token_file, GATEWAY_TOKEN_ENV, "--token-file"),
        worker_token=_token(args.worker_token_file, WORKER_TOKEN_ENV, "--worker-token-file"),
    )
    return asyncio.run(_serve(gateway))


async def _serve(gateway: Gateway) -> int:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    host = gateway.options.host
    grpc = "" if gateway.grpc_port is None else f", gRPC on {host}:{gateway.grpc_port}"
    print(
        f"elasticfleet gateway listening on http://{host}:{gateway.port}{grpc}; workers from "
        f"{gateway.service.pool.source.description}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await gateway.stop()
    return 0
