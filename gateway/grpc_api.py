"""`elasticfleet.v1.Worker/Generate` through the gateway: a gRPC client of
one worker (`elasticfleet generate`, WorkerClient, grpcurl) points at the
gateway instead and gets the fleet, routed as HTTP requests are.

The request and its messages pass through unchanged; the adapter comes
from the request's `adapter` field and the quality floor from the
`x-max-perplexity-ratio` metadata. The gateway's bearer token is checked
from `authorization` metadata (the worker's own token is the gateway's to
send). An error takes the status code its kind maps to (errors.py),
which for a worker's error is the worker's own code in all common cases.
The other Worker RPCs (plans, stats, adapters) are
the operator's and stay UNIMPLEMENTED here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.routing import AdapterRef, check_ratio
from elasticfleet.gateway.service import RATIO_HEADER, Admission, GatewayService
from elasticfleet.worker.serving.client import MAX_MESSAGE_BYTES
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.proto_gen import worker_pb2_grpc as pb_grpc


def _admission(request: pb.GenerateRequest, metadata: dict[str, str]) -> Admission:
    adapter = None
    if request.HasField("adapter"):
        selection = request.adapter
        task = selection.task if selection.WhichOneof("head") == "task" else None
        adapter = AdapterRef(selection.name, task)
    try:
        max_ratio = check_ratio(metadata.get(RATIO_HEADER), RATIO_HEADER)
    except ValueError as error:
        raise GatewayError(Kind.INVALID, str(error)) from None
    return Admission(request, adapter, max_ratio)


class GatewayServicer(pb_grpc.WorkerServicer):
    """Generate, routed; the rest inherit UNIMPLEMENTED."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        started = time.monotonic()
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        metrics = self.service.metrics
        try:
            self.service.require_auth(metadata.get("authorization"))
            upstream = await self.service.open(_admission(request, metadata), "grpc", started)
            try:
                async for message in upstream.messages():
                    yield message
            finally:
                await upstream.close()
        except GatewayError as error:
            metrics.count("grpc", error.kind.grpc_code.name)
            await context.abort(error.kind.grpc_code, error.message)
        metrics.count("grpc", grpc.StatusCode.OK.name)


async def serve_grpc(service: GatewayService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server on host:port (0: a free port), and its port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    # The generated base answers UNIMPLEMENTED for the RPCs not overridden;
    # only its type stubs call them abstract.
    servicer = GatewayServicer(service)  # type: ignore[abstract]
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
