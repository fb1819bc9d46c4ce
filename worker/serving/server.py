"""The worker's gRPC server: a thin asyncio servicer over the engine.

The servicer only converts between protobuf messages and engine calls; all
model logic is in worker/serving/engine.py. One interceptor maps the engine's
exceptions to status codes (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAVAILABLE, DATA_LOSS, and
INTERNAL for anything else, whose details stay in the worker's log);
another checks an optional bearer token on every RPC but the standard
health checks (Kubernetes' gRPC probes cannot send one).

Generation streams are asyncio generators fed by the engine thread through
`call_soon_threadsafe`, so hundreds of concurrent streams cost no threads. A
stream that ends early (client cancelled, deadline passed) cancels its
request in the engine, which frees its KV before the next step. Shutdown
drains: health turns NOT_SERVING, new requests get UNAVAILABLE, running
ones finish (up to a timeout), then the server stops.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elasticfleet.worker.adapters.interface import AdapterInfo, AdapterRequest
from elasticfleet.worker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.generation import SamplingParams, chat_prompt
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import FINISH_NAMES, MAX_MESSAGE_BYTES
from elasticfleet.worker.serving.engine import Engine, EnginePicture, TokenEvent
from elasticfleet.worker.serving.metrics import MetricsServer
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.proto_gen import worker_pb2_grpc as pb_grpc
from elasticfleet.worker.serving.telemetry import (
    Histogram,
    read_device,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")

STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DataLoss, grpc.StatusCode.DATA_LOSS),
)

FINISH_REASONS = {name: reason for reason, name in FINISH_NAMES.items()}

MEMORY_SOURCES = {
    "nvml": pb.MEMORY_SOURCE_NVML,
    "host": pb.MEMORY_SOURCE_HOST,
    "simulated": pb.MEMORY_SOURCE_SIMULATED,
}


def worker_memory(picture: EnginePicture) -> pb.WorkerMemory:
    return pb.WorkerMemory(
        weight_bytes=picture.weight_bytes,
        kv_reserved_bytes=picture.kv_reserved_bytes,
        kv_used_bytes=picture.kv_used_bytes,
        adapter_bytes=picture.adapter_bytes,
        budget_bytes=picture.budget_bytes,
        kv_committed_bytes=picture.kv_committed_bytes,
    )


def status_code(error: BaseException) -> grpc.StatusCode:
    """The status code an exception maps to (INTERNAL when unknown)."""
    for kind, code in STATUS_CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    code = status_code(error)
    message = str(error)
    if code == grpc.StatusCode.INTERNAL:
        # The details may hold internals; the caller gets the kind, the log the rest.
        log.exception("internal error in an RPC", exc_info=error)
        message = f"internal error ({type(error).__name__}); see the worker log"
    await context.abort(code, message)


# Strings: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any] | None"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by unary and server-streaming handlers to status codes."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # The stubs type handlers as synchronous; an aio server's are coroutines.
        if handler.unary_unary is not None and asyncio.iscoroutinefunction(handler.unary_unary):
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await unary(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await _abort_for(error, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for response in stream(request, context):
                        yield response
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await _abort_for(error, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without `authorization: Bearer <token>` (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        if handler_call_details.method in HEALTH_METHODS:
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        sent = metadata.get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_bytes, self.expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
            )

        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def sampling_params(request: pb.GenerateRequest, default_max_new_tokens: int) -> SamplingParams:
    """The engine's SamplingParams from a request, or InvalidArgument."""
    sampling = request.sampling
    try:
        return SamplingParams(
            max_new_tokens=request.max_new_tokens or default_max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p or 1.0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=tuple(request.stop),
            ignore_eos=request.ignore_eos,
        )
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def adapter_request(request: pb.GenerateRequest) -> AdapterRequest | None:
    if not request.HasField("adapter"):
        return None
    adapter = request.adapter
    if not adapter.name:
        raise InvalidArgument("adapter.name is empty; name a loaded adapter set")
    head = adapter.WhichOneof("head")
    if head is None:
        raise InvalidArgument(
            f"adapter {adapter.name!r} needs a task, or router mixing, to choose its heads"
        )
    return AdapterRequest(adapter.name, adapter.task if head == "task" else None)


def token_message(event: TokenEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=event.request_id,
        token_ids=event.token_ids,
        text=event.text,
        finish_reason=FINISH_REASONS[event.finish_reason],
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        decode_step=event.decode_step,
        plan_id=event.plan_id,
    )


def histogram_message(histogram: Histogram) -> pb.Histogram:
    return pb.Histogram(upper_bounds=histogram.upper_bounds, counts=histogram.counts)


def adapter_message(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=info.name,
        version=info.version,
        base_model=info.base_model,
        rank=info.rank,
        tasks=info.tasks,
        bytes=info.bytes,
        has_router=info.has_router,
    )


class WorkerService(pb_grpc.WorkerServicer):
    """elasticfleet.v1.Worker over an Engine."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        default_max_new_tokens: int = 256,
        plan_wait_s: float = 30.0,
        simulated_device: Path | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.default_max_new_tokens = default_max_new_tokens
        self.plan_wait_s = plan_wait_s
        self.simulated_device = simulated_device

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        params = sampling_params(request, self.default_max_new_tokens)
        adapter = adapter_request(request)
        if not request.prompt:
            raise InvalidArgument("prompt is empty; send at least one character")
        prompt = chat_prompt(request.prompt) if request.chat_template else request.prompt
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()

        def sink(event: TokenEvent | Exception) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        request_id = self.engine.submit(
            prompt, params, sink, request_id=request.request_id, adapter=adapter
        )
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, Exception):
                    finished = True
                    raise event
                finished = bool(event.finish_reason)
                yield token_message(event)
        finally:
            if not finished:
                self.engine.cancel(request_id)

    async def ApplyPlan(
        self, request: pb.ApplyPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApplyPlanResponse:
        layers = self.engine.model.config.num_hidden_layers
        try:
            plan = PruningPlan.from_mask(list(request.keep_mask), layers)
        except ValueError as error:
            raise InvalidArgument(f"keep_mask: {error}") from None
        budget = request.budget_bytes if request.HasField("budget_bytes") else None
        remaining = context.time_remaining()
        wait = self.plan_wait_s if remaining is None else min(remaining, self.plan_wait_s)
        future = self.engine.submit_plan(plan, request.plan_id or "unnamed", budget, wait)
        switch = await asyncio.wrap_future(future)
        return pb.ApplyPlanResponse(
            plan_id=switch.plan_id,
            bytes_before=switch.bytes_before,
            bytes_after=switch.bytes_after,
            effective_step=switch.effective_step,
            kept_blocks=switch.kept_blocks,
            memory=worker_memory(switch.after),
        )

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        stats = self.engine.stats()
        picture, mix = stats.picture, stats.mix
        try:
            device = await asyncio.to_thread(
                read_device, self.simulated_device, picture.total_bytes
            )
        except ValueError as error:  # a broken simulated device file
            raise FailedPrecondition(str(error)) from None
        source = MEMORY_SOURCES[device.source]
        return pb.GetStatsResponse(
            device=pb.DeviceMemory(
                total_bytes=device.total_bytes,
                used_bytes=device.used_bytes,
                free_bytes=device.free_bytes,
                source=source,
                detail=device.detail,
            ),
            memory=worker_memory(picture),
            queue_depth=stats.queue_depth,
            active_sequences=picture.active_sequences,
            mix=pb.RequestMix(
                window_seconds=mix.window_s,
                batch_size=histogram_message(mix.batch_size),
                prompt_tokens=histogram_message(mix.prompt_tokens),
                output_tokens=histogram_message(mix.output_tokens),
                finished_requests=mix.finished_requests,
                batch_size_p90=mix.batch_size_p90,
                sequence_tokens_p90=mix.sequence_tokens_p90,
            ),
            tokens_per_second=mix.tokens_per_second,
            plan_id=picture.plan_id,
            keep_mask=picture.keep_mask,
            decode_step=picture.decode_step,
            model=self.model_name,
        )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadAdapterResponse:
        if not request.name:
            raise InvalidArgument("name is empty; name the adapter set to load")
        info, hit = await asyncio.to_thread(
            self.engine.load_adapter, request.name, request.version, list(request.tasks)
        )
        return pb.LoadAdapterResponse(adapter=adapter_message(info), cache_hit=hit)

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadAdapterResponse:
        freed = await asyncio.to_thread(self.engine.unload_adapter, request.name)
        return pb.UnloadAdapterResponse(bytes_freed=freed)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAdaptersResponse:
        listing = self.engine.list_adapters()
        return pb.ListAdaptersResponse(
            adapters=[adapter_message(info) for info in listing.adapters],
            cache_bytes=listing.cache_bytes,
            cache_limit_bytes=listing.cache_limit_bytes,
        )


@dataclass(frozen=True)
class ServerOptions:
    """How a worker server listens. Ports 0 pick a free port; metrics_port
    None serves no metrics."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    model_name: str = ""
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    default_max_new_tokens: int = 256
    # Longest an ApplyPlan waits for running requests to make room.
    plan_wait_s: float = 30.0
    drain_timeout_s: float = 30.0
    # Report this file's device instead of NVML's or the host's (telemetry.simulated_memory).
    simulated_device: Path | None = None


class WorkerServer:
    """A started gRPC server, its engine thread and its metrics endpoint."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.port = 0
        self.metrics: MetricsServer | None = None

    async def start(self) -> None:
        """Bind, start serving and start the engine's thread. Runs on the
        event loop that will serve (grpc.aio binds a server to its loop)."""
        options = self.options
        self.health = health.aio.HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if options.token:
            interceptors.append(TokenInterceptor(options.token))
        interceptors.append(ErrorInterceptor())
        limit = options.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        service = WorkerService(
            self.engine,
            options.model_name,
            options.default_max_new_tokens,
            options.plan_wait_s,
            options.simulated_device,
        )
        pb_grpc.add_WorkerServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{options.host}:{options.port}"
        if options.tls_cert is not None and options.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())]
            )
            self.port = self.server.add_secure_port(address, credentials)
        elif options.tls_cert is not None or options.tls_key is not None:
            raise ValueError("TLS needs both a certificate and a key file")
        else:
            self.port = self.server.add_insecure_port(address)
        self.engine.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if options.metrics_port is not None:
            self.metrics = MetricsServer(self.engine, options.host, options.metrics_port)

    async def stop(self) -> bool:
        """Drain and stop; returns whether every request finished in time."""
        await self.health.enter_graceful_shutdown()
        drained = await asyncio.to_thread(self.engine.drain, self.options.drain_timeout_s)
        # Requests still running after the timeout fail with UNAVAILABLE.
        await asyncio.to_thread(self.engine.close)
        await self.server.stop(grace=1.0)
        if self.metrics is not None:
            self.metrics.close()
        return drained

    async def wait(self) -> None:
        await self.server.wait_for_termination()


class BackgroundServer:
    """A WorkerServer on its own event loop thread, for tests, benchmarks and
    embedding in synchronous code."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server")
        self._thread.start()
        self.server = WorkerServer(engine, options)
        try:
            self._call(self.server.start())
        except BaseException:
            self._shutdown_loop()
            raise
        self.port = self.server.port
        self.metrics_port = None if self.server.metrics is None else self.server.metrics.port

    def _call(self, coroutine: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(cast(Any, coroutine), self._loop).result()

    def stop(self) -> bool:
        """Drain, stop the server and its loop; returns whether it drained in time."""
        try:
            return bool(self._call(self.server.stop()))
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
