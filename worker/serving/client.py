"""Python clients for a worker: synchronous (`WorkerClient`) and asyncio
(`AsyncWorkerClient`), over plaintext or TLS, with an optional bearer token.

They build the same requests (`generate_request`) and return the protobuf
messages as they are, so nothing about the protocol is hidden; `complete`
collects a stream into one `CompletionResult` for callers that do not
stream. Errors arrive as grpc.RpcError (grpc.aio.AioRpcError) with the
worker's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Self

import grpc
import grpc.aio

from elasticfleet.worker.serving.credentials import ClientTls
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.proto_gen import worker_pb2_grpc as pb_grpc

# A prompt at the model's 8k context is ~32 KB; 4 MiB leaves room for any
# sane request and bounds what one message can make a worker buffer. The
# worker's server takes the same default.
MAX_MESSAGE_BYTES = 4 * 2**20
FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


def generate_request(
    prompt: str,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat_template: bool = False,
    ignore_eos: bool = False,
    request_id: str = "",
    adapter: str | None = None,
    task: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest. With an adapter, `task` selects its head; no task
    means router mixing."""
    request = pb.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
        sampling=pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p),
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        request.sampling.seed = seed
    if adapter is not None:
        request.adapter.name = adapter
        if task is None:
            request.adapter.router.SetInParent()
        else:
            request.adapter.task = task
    return request


def plan_request(
    plan_id: str,
    keep_mask: Sequence[bool],
    budget_bytes: int | None = None,
    levels: Sequence[pb.BlockLevel.ValueType] = (),
    kv_levels: Sequence[pb.KvLevel.ValueType] = (),
) -> pb.ApplyPlanRequest:
    """ApplyPlan's request; `levels` and `kv_levels` as
    `elasticfleet.worker.serving.plans.level_fields` gives them."""
    request = pb.ApplyPlanRequest(
        plan_id=plan_id, keep_mask=list(keep_mask), levels=levels, kv_levels=kv_levels
    )
    if budget_bytes is not None:
        request.budget_bytes = budget_bytes
    return request


@dataclass
class CompletionResult:
    """A whole completion collected from a Generate stream."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    messages: list[pb.GenerateResponse] = field(default_factory=list)

    def add(self, message: pb.GenerateResponse) -> None:
        self.request_id = message.request_id
        self.text += message.text
        self.token_ids.extend(message.token_ids)
        self.finish_reason = FINISH_NAMES[message.finish_reason]
        self.prompt_tokens = message.prompt_tokens
        self.messages.append(message)


def _options(server_name: str | None = None) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if server_name:
        # Verify the certificate against this name, not the target's host.
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _channel(
    channels: ModuleType, target: str, tls: ClientTls | None, server_name: str | None
) -> Any:
    """A channel from `channels` (grpc, or grpc.aio: the same factories)."""
    if tls is None:
        if server_name:
            raise ValueError("root_certificates and server_name need tls=True")
        return channels.insecure_channel(target, options=_options())
    credentials = tls.channel_credentials()
    return channels.secure_channel(target, credentials, options=_options(server_name))


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


class _ClientBase:
    """What both clients hold: a channel from `CHANNELS` (grpc or grpc.aio,
    whose factories match), the stub over it and the call metadata. `tls=True`
    verifies the server against `root_certificates` (PEM; None means the
    system's roots) and the name in `target`, or `server_name` when given (a
    pod reached by IP whose certificate names its DNS name). `tls` may be a
    `ClientTls` instead, which also carries the client certificate and key
    presented to workers that require one (mutual TLS)."""

    CHANNELS: ClassVar[ModuleType]

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | ClientTls = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        if isinstance(tls, ClientTls):
            if root_certificates is not None:
                raise ValueError("give the roots in the ClientTls")
            settings: ClientTls | None = tls
        elif tls:
            settings = ClientTls(root_certificates)
        elif root_certificates is not None:
            raise ValueError("root_certificates and server_name need tls=True")
        else:
            settings = None
        self.channel = _channel(self.CHANNELS, target, settings, server_name)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.metadata = _metadata(token)


class WorkerClient(_ClientBase):
    """A blocking client (arguments: see _ClientBase)."""

    CHANNELS: ClassVar[ModuleType] = grpc
    channel: grpc.Channel

    def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """Stream a completion's messages. Breaking out of the loop early
        does not cancel the request: call cancel() on the returned iterator
        (a grpc.Call) for that."""
        stream: Iterator[pb.GenerateResponse] = self.stub.Generate(
            request, timeout=timeout, metadata=self.metadata
        )
        return stream

    def complete(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> CompletionResult:
        result = CompletionResult()
        for message in self.generate(request, timeout=timeout):
            result.add(message)
        return result

    def apply_plan(
        self,
        plan_id: str,
        keep_mask: Sequence[bool],
        budget_bytes: int | None = None,
        *,
        timeout: float | None = None,
        levels: Sequence[pb.BlockLevel.ValueType] = (),
        kv_levels: Sequence[pb.KvLevel.ValueType] = (),
    ) -> pb.ApplyPlanResponse:
        request = plan_request(plan_id, keep_mask, budget_bytes, levels, kv_levels)
        response: pb.ApplyPlanResponse = self.stub.ApplyPlan(
            request, timeout=timeout, metadata=self.metadata
        )
        return response

    def get_stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        response: pb.GetStatsResponse = self.stub.GetStats(
            pb.GetStatsRequest(), timeout=timeout, metadata=self.metadata
        )
        return response

    def load_adapter(
        self,
        name: str,
        version: str = "",
        tasks: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> pb.LoadAdapterResponse:
        request = pb.LoadAdapterRequest(name=name, version=version, tasks=list(tasks))
        response: pb.LoadAdapterResponse = self.stub.LoadAdapter(
            request, timeout=timeout, metadata=self.metadata
        )
        return response

    def unload_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> pb.UnloadAdapterResponse:
        response: pb.UnloadAdapterResponse = self.stub.UnloadAdapter(
            pb.UnloadAdapterRequest(name=name), timeout=timeout, metadata=self.metadata
        )
        return response

    def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        response: pb.ListAdaptersResponse = self.stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=timeout, metadata=self.metadata
        )
        return response

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncWorkerClient(_ClientBase):
    """The asyncio client; same arguments and methods as WorkerClient."""

    CHANNELS: ClassVar[ModuleType] = grpc.aio
    channel: grpc.aio.Channel

    async def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a completion's messages; leaving the loop early cancels the request."""
        call = self.stub.Generate(request, timeout=timeout, metadata=self.metadata)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def complete(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> CompletionResult:
        result = CompletionResult()
        async for message in self.generate(request, timeout=timeout):
            result.add(message)
        return result

    async def apply_plan(
        self,
        plan_id: str,
        keep_mask: Sequence[bool],
        budget_bytes: int | None = None,
        *,
        timeout: float | None = None,
        levels: Sequence[pb.BlockLevel.ValueType] = (),
        kv_levels: Sequence[pb.KvLevel.ValueType] = (),
    ) -> pb.ApplyPlanResponse:
        request = plan_request(plan_id, keep_mask, budget_bytes, levels, kv_levels)
        response: pb.ApplyPlanResponse = await self.stub.ApplyPlan(
            request, timeout=timeout, metadata=self.metadata
        )
        return response

    async def get_stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        response: pb.GetStatsResponse = await self.stub.GetStats(
            pb.GetStatsRequest(), timeout=timeout, metadata=self.metadata
        )
        return response

    async def load_adapter(
        self,
        name: str,
        version: str = "",
        tasks: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> pb.LoadAdapterResponse:
        request = pb.LoadAdapterRequest(name=name, version=version, tasks=list(tasks))
        response: pb.LoadAdapterResponse = await self.stub.LoadAdapter(
            request, timeout=timeout, metadata=self.metadata
        )
        return response

    async def unload_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> pb.UnloadAdapterResponse:
        response: pb.UnloadAdapterResponse = await self.stub.UnloadAdapter(
            pb.UnloadAdapterRequest(name=name), timeout=timeout, metadata=self.metadata
        )
        return response

    async def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        response: pb.ListAdaptersResponse = await self.stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=timeout, metadata=self.metadata
        )
        return response

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
