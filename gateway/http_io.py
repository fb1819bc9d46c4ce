"""What both HTTP APIs do with a request and a worker's stream: read and
check a JSON body, relay the stream as server-sent events, or collect it
whole.

Errors before the first token are answered with a status code (the
stream's headers are sent only once a worker has produced its first
message, so a request that cannot be served never gets a 200); an error
after that can only be one more event, in the API's shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.pool import Upstream
from elasticfleet.gateway.routing import check_ratio
from elasticfleet.gateway.service import RATIO_RESPONSE_HEADER, WORKER_HEADER
from elasticfleet.worker.serving.client import CompletionResult
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; GatewayError INVALID otherwise."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as error:
        raise GatewayError(Kind.INVALID, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise GatewayError(Kind.INVALID, "the body must be a JSON object")
    return body


def invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID, message)


def number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    """`body[name]`: None when absent, else a number (an integer where
    asked) within [low, high]; GatewayError INVALID otherwise."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise invalid(f"`{name}` must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise invalid(f"`{name}` must be between {low} and {high}, got {value}")
    return value


def refuse_unsupported(body: dict[str, Any], table: dict[str, tuple[object, ...]]) -> None:
    """Refuse a parameter the workers cannot honour, unless it holds one of
    the values that mean "off" (table: name -> those values)."""
    for name, off in table.items():
        if body.get(name) not in off:
            raise invalid(f"`{name}` is not supported by this server")


def quality_floor(body: dict[str, Any], header: str | None) -> float | None:
    """The request's quality floor: the body's `max_perplexity_ratio`, else
    the X-Max-Perplexity-Ratio header; None for neither."""
    value = body.get("max_perplexity_ratio")
    try:
        return check_ratio(value if value is not None else header, "max_perplexity_ratio")
    except ValueError as error:
        raise invalid(str(error)) from None


def upstream_headers(upstream: Upstream) -> dict[str, str]:
    """Which worker serves the request and its plan's predicted ratio."""
    headers = {WORKER_HEADER: upstream.worker}
    if upstream.ratio is not None:
        headers[RATIO_RESPONSE_HEADER] = f"{upstream.ratio:.4f}"
    return headers


async def send_event(response: web.StreamResponse, data: object) -> None:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await response.write(f"data: {text}\n\n".encode())


async def relay(
    request: web.Request,
    upstream: Upstream,
    convert: Callable[[pb.GenerateResponse], Iterable[object]],
    on_error: Callable[[GatewayError], object],
    finish: Callable[[], Iterable[object]] = tuple,
) -> web.StreamResponse:
    """Stream `upstream` as server-sent events: `convert` turns each message
    into events, `finish` adds the last ones, `on_error` renders a failure
    midway. The upstream call is closed however this ends (a client that
    disconnects cancels the handler here, and so the worker's request)."""
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **upstream_headers(upstream),
            }
        )
        await response.prepare(request)
        try:
            async for message in upstream.messages():
                for event in convert(message):
                    await send_event(response, event)
            events = finish()
        except GatewayError as error:
            events = [on_error(error)]
        for event in events:
            await send_event(response, event)
        await response.write_eof()
    finally:
        await upstream.close()
    return response


async def collect(upstream: Upstream) -> CompletionResult:
    """The whole completion; the upstream call is closed however this ends."""
    result = CompletionResult()
    try:
        async for message in upstream.messages():
            result.add(message)
    finally:
        await upstream.close()
    return result
