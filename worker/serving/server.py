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

The event loop does no CPU work of size set by a client: prompts are
tokenized on a small executor of their own (Engine.prepare), so health
checks and running streams go on while a long prompt is tokenized. A client's
mistake is never INTERNAL or UNKNOWN: request bytes that do not parse are
INVALID_ARGUMENT, and status details are cut to MAX_DETAILS characters so
that no echoed value can overflow the trailing metadata. If the engine
thread dies, health turns NOT_SERVING and calls fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
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
from elasticfleet.worker.serving.client import FINISH_NAMES, MAX_MESSAGE_BYTES
from elasticfleet.worker.serving.credentials import ServerTls, TokenFile
from elasticfleet.worker.serving.engine import (
    MAX_ADAPTER_NAME,
    Engine,
    EnginePicture,
    TokenEvent,
    check_length,
)
from elasticfleet.worker.serving.metrics import MetricsServer
from elasticfleet.worker.serving.plans import level_fields, plan_from_fields
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.proto_gen import worker_pb2_grpc as pb_grpc
from elasticfleet.worker.serving.telemetry import DeviceMemory, Histogram

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

# Longest status detail sent: messages are sentences with bounded values in
# them, and this bounds whatever slips through (gRPC's trailing metadata is
# limited to a few KiB by default; a client over it sees a broken call).
MAX_DETAILS = 1024
# Threads that tokenize prompts: as many as the cores a worker usually
# gets, so a burst of long prompts queues here instead of occupying the
# default executor that other RPCs (GetStats, adapter loads) use.
TOKENIZER_THREADS = 2

MEMORY_SOURCES = {
    "nvml": pb.MEMORY_SOURCE_NVML,
    "host": pb.MEMORY_SOURCE_HOST,
    "simulated": pb.MEMORY_SOURCE_SIMULATED,
}


def device_message(device: DeviceMemory) -> pb.DeviceMemory:
    """The message for a device reading: the same fields, the source as the enum."""
    return pb.DeviceMemory(**{**asdict(device), "source": MEMORY_SOURCES[device.source]})


def worker_memory(picture: EnginePicture) -> pb.WorkerMemory:
    return pb.WorkerMemory(
        weight_bytes=picture.weight_bytes,
        kv_reserved_bytes=picture.kv_reserved_bytes,
        kv_used_bytes=picture.kv_used_bytes,
        adapter_bytes=picture.adapter_bytes,
        budget_bytes=picture.budget_bytes,
        kv_committed_bytes=picture.kv_committed_bytes,
        kv_block_tokens=picture.kv_block_tokens,
        kv_blocks_in_use=picture.kv_blocks_in_use,
        kv_blocks_reserved=picture.kv_blocks_reserved,
        kv_blocks_committed=picture.kv_blocks_committed,
    )


def status_code(error: BaseException) -> grpc.StatusCode:
    """The status code an exception maps to (INTERNAL when unknown)."""
    for kind, code in STATUS_CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def bounded_details(message: str) -> str:
    """`message`, cut to MAX_DETAILS characters."""
    if len(message) <= MAX_DETAILS:
        return message
    return message[: MAX_DETAILS - 15] + " ...(truncated)"


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    code = status_code(error)
    message = str(error)
    if code == grpc.StatusCode.INTERNAL:
        # The details may hold internals; the caller gets the kind, the log the rest.
        log.exception("internal error in an RPC", exc_info=error)
        message = f"internal error ({type(error).__name__}); see the worker log"
    await context.abort(code, bounded_details(message))


class Undecodable:
    """What a request deserializes to when its bytes are not the RPC's
    message. grpc answers UNKNOWN for a deserializer that raises; this lets
    the handler answer INVALID_ARGUMENT instead."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, answering Undecodable instead of raising."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, or whatever a parser raises on garbage
            owner = getattr(parse, "__self__", None)  # Message.FromString's class
            return Undecodable(getattr(owner, "__name__", "request"))

    return deserialize


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request's bytes are not a valid {request.message_name} message",
        )


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
                await _refuse_undecodable(request, context)
                try:
                    return await unary(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await _abort_for(error, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await _refuse_undecodable(request, context)
                try:
                    async for response in stream(request, context):
                        yield response
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await _abort_for(error, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without `authorization: Bearer <token>` (health checks
    excepted). The token is a fixed string or a TokenFile, asked on every
    RPC so that a rotated Secret is in force without a restart."""

    def __init__(self, token: str | TokenFile) -> None:
        self.token = token

    @property
    def expected(self) -> bytes:
        token = self.token if isinstance(self.token, str) else self.token.current()
        return f"Bearer {token}".encode()

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
    check_length("adapter.name", adapter.name, MAX_ADAPTER_NAME)
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
        stale=info.stale,
    )


class WorkerService(pb_grpc.WorkerServicer):
    """elasticfleet.v1.Worker over an Engine."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        tokenizer_pool: ThreadPoolExecutor,
        default_max_new_tokens: int = 256,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer_pool = tokenizer_pool
        self.default_max_new_tokens = default_max_new_tokens

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

        # Tokenizing is CPU work sized by the client: off the event loop. A
        # caller that leaves meanwhile leaves nothing queued (prepare only computes).
        prepared = await loop.run_in_executor(
            self.tokenizer_pool,
            partial(
                self.engine.prepare, prompt, params, request_id=request.request_id, adapter=adapter
            ),
        )
        request_id = self.engine.enqueue(prepared, sink)
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
            plan = plan_from_fields(request.keep_mask, request.levels, request.kv_levels, layers)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        budget = request.budget_bytes if request.HasField("budget_bytes") else None
        future = self.engine.submit_plan(plan, request.plan_id or "unnamed", budget)
        switch = await asyncio.wrap_future(future)
        return pb.ApplyPlanResponse(
            plan_id=switch.plan_id,
            bytes_before=switch.bytes_before,
            bytes_after=switch.bytes_after,
            effective_step=switch.effective_step,
            kept_blocks=switch.kept_blocks,
            memory=worker_memory(switch.after),
            device=None if switch.device is None else device_message(switch.device),
            preempted=switch.preempted,
        )

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        # The device's figures and the worker's own from one moment, between
        # two iterations (Engine.snapshot); a dead engine answers Unavailable,
        # since its stale figures would mislead the operator.
        try:
            snapshot = await asyncio.wrap_future(self.engine.snapshot())
        except ValueError as error:  # a broken simulated device file
            raise FailedPrecondition(str(error)) from None
        stats = snapshot.stats
        picture, mix = stats.picture, stats.mix
        levels, kv_levels = level_fields(picture.plan) if picture.plan else ([], [])
        return pb.GetStatsResponse(
            device=device_message(snapshot.device),
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
            levels=levels,
            kv_levels=kv_levels,
        )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadAdapterResponse:
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


def server_tls(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> ServerTls | None:
    """What to serve TLS with (and, with `client_ca`, to verify client
    certificates against), None for plaintext; ValueError in one line for a
    half or a broken pair, an unusable CA bundle, or a client CA without TLS."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("a client CA (mutual TLS) needs TLS: give a certificate and key too")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and a key file")
    return ServerTls.from_files(cert, key, client_ca)


@dataclass(frozen=True)
class ServerOptions:
    """How a worker server listens. Ports 0 pick a free port; metrics_port
    None serves no metrics, metrics_host None serves them on `host`. A
    token_file is re-read when it changes and takes precedence over token."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    metrics_host: str | None = None
    model_name: str = ""
    token: str | None = None
    token_file: Path | None = None
    # How often, at most, the token file is looked at (one stat per interval).
    token_check_interval_s: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Clients must present a certificate one of these CAs signed (mutual TLS).
    tls_client_ca: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    default_max_new_tokens: int = 256
    drain_timeout_s: float = 30.0


class WorkerServer:
    """A started gRPC server, its engine thread and its metrics endpoint."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.port = 0
        self.metrics: MetricsServer | None = None

    async def start(self) -> None:
        """Bind, start serving and start the engine's thread. Runs on the
        event loop that will serve (grpc.aio binds a server to its loop).
        ValueError, before anything starts, for TLS files that are not a
        usable pair or a token file that holds no token."""
        options = self.options
        tls = server_tls(options.tls_cert, options.tls_key, options.tls_client_ca)
        self.health = health.aio.HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if options.token_file is not None:
            token = TokenFile(options.token_file, options.token_check_interval_s)
            interceptors.append(TokenInterceptor(token))
        elif options.token:
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
        self.tokenizer_pool = ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="elasticfleet-tokenize"
        )
        service = WorkerService(
            self.engine,
            options.model_name,
            self.tokenizer_pool,
            options.default_max_new_tokens,
        )
        pb_grpc.add_WorkerServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{options.host}:{options.port}"
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
        self.engine.start()
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self.engine.on_failure(partial(self._engine_failed, loop))
        if options.metrics_port is not None:
            host = options.metrics_host or options.host
            self.metrics = MetricsServer(self.engine, host, options.metrics_port)

    async def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _engine_failed(self, loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
        """From the dying engine thread: turn NOT_SERVING, so probes and
        load balancers stop sending work here (calls already fail fast)."""
        not_serving = self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            asyncio.run_coroutine_threadsafe(not_serving, loop)
        except RuntimeError:  # the loop has closed: nothing is served any more
            not_serving.close()

    async def stop(self) -> bool:
        """Drain and stop; returns whether every request finished in time."""
        await self.health.enter_graceful_shutdown()
        drained = await asyncio.to_thread(self.engine.drain, self.options.drain_timeout_s)
        # Requests still running after the timeout fail with UNAVAILABLE.
        await asyncio.to_thread(self.engine.close)
        await self.server.stop(grace=1.0)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
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
