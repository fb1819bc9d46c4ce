"""Text Generation Inference's HTTP API: POST /generate, /generate_stream
(server-sent events) and / (the compat route TGI's own Python client
calls: a list of one response, or the event stream when `stream` is true).

`parameters.adapter_id` names an adapter as `<adapterset>:<task>` (or a
set alone, for its router mixture); `parameters.max_perplexity_ratio`, or
the X-Max-Perplexity-Ratio header, is the request's quality floor.
Parameters TGI has and a worker cannot honour (best_of above 1, penalties,
watermark, grammar, truncate, typical_p, top_n_tokens, prefill details)
are refused with a validation error rather than ignored.

Errors are TGI's: `{"error": message, "error_type": type}` with 422
validation, 429 overloaded (and Retry-After), 424 generation (a worker
failed), 503 unavailable, 404 not found, 401 unauthorized; TGI's client
raises its ValidationError, OverloadedError and GenerationError from the
error types. Streamed tokens carry their text so that they join into
`generated_text`; a worker's last message without tokens (the
end-of-sequence token is never streamed) becomes one special token of id
0 holding whatever text remained.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from elasticfleet.gateway import http_io
from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.routing import AdapterRef
from elasticfleet.gateway.service import RATIO_HEADER, Admission, GatewayService
from elasticfleet.worker.serving.client import FINISH_NAMES, CompletionResult, generate_request
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

MAX_STOP = 16
DEFAULT_MAX_NEW_TOKENS = 100
FINISH_REASONS = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}
ERROR_TYPES = {
    Kind.INVALID: (422, "validation"),
    Kind.UNAUTHORIZED: (401, "authentication"),
    Kind.NOT_FOUND: (404, "not_found"),
    Kind.OVERLOADED: (429, "overloaded"),
    Kind.UNAVAILABLE: (503, "unavailable"),
    Kind.GENERATION: (424, "generation"),
}
# name -> the value that means "off" (None: absent); anything else is refused.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "repetition_penalty": (None, 1.0),
    "frequency_penalty": (None, 0.0, 1.0),
    "watermark": (None, False),
    "grammar": (None,),
    "truncate": (None,),
    "typical_p": (None,),
    "top_n_tokens": (None, 0),
    "decoder_input_details": (None, False),
}


def tgi_error(error: GatewayError) -> tuple[int, dict[str, str]]:
    status, error_type = ERROR_TYPES[error.kind]
    return status, {"error": error.message, "error_type": error_type}


def parse_request(
    body: dict[str, Any], header_ratio: str | None
) -> tuple[Admission, dict[str, Any]]:
    """The worker request a TGI body asks for, and its parameters."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise http_io.invalid("`inputs` must be a non-empty string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise http_io.invalid("`parameters` must be an object")
    http_io.refuse_unsupported(params, UNSUPPORTED)
    max_new = http_io.number(params, "max_new_tokens", 1, 1_000_000, integer=True)
    temperature = http_io.number(params, "temperature", 1e-3, 100.0)
    top_k = http_io.number(params, "top_k", 1, 1 << 31, integer=True)
    top_p = http_io.number(params, "top_p", 1e-9, 1.0)
    seed = http_io.number(params, "seed", 0, (1 << 64) - 1, integer=True)
    stop = params.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise http_io.invalid("`stop` must be a list of non-empty strings")
    if len(stop) > MAX_STOP:
        raise http_io.invalid(f"`stop` has {len(stop)} sequences; at most {MAX_STOP}")
    # TGI samples when asked to, or when a sampling knob is set.
    sample = bool(params.get("do_sample")) or any(
        v is not None for v in (temperature, top_k, top_p)
    )
    adapter_id = params.get("adapter_id")
    try:
        adapter = None if adapter_id in (None, "") else AdapterRef.parse(str(adapter_id))
    except ValueError as error:
        raise http_io.invalid(str(error)) from None
    max_ratio = http_io.quality_floor(params, header_ratio)
    request = generate_request(
        inputs,
        max_new_tokens=max_new or DEFAULT_MAX_NEW_TOKENS,
        temperature=(temperature or 1.0) if sample else 0.0,
        top_k=top_k or 0,
        top_p=top_p or 0.0,
        seed=seed,
        stop=stop,
        adapter=None if adapter is None else adapter.name,
        task=None if adapter is None else adapter.task,
    )
    return Admission(request, adapter, max_ratio), params


def _token(token_id: int, text: str, special: bool = False) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": None, "special": special}


def _tokens(message: pb.GenerateResponse) -> list[dict[str, Any]]:
    """A message's tokens, its text on the last one (the worker releases
    text per message, not per token)."""
    ids = list(message.token_ids)
    if not ids:
        return [_token(0, message.text, special=not message.text)] if message.finish_reason else []
    return [_token(t, message.text if i == len(ids) - 1 else "") for i, t in enumerate(ids)]


def _seed(admission: Admission) -> int | None:
    sampling = admission.request.sampling
    return sampling.seed if sampling.HasField("seed") else None


def _response(
    admission: Admission, params: dict[str, Any], result: CompletionResult
) -> dict[str, Any]:
    text = result.text
    if params.get("return_full_text"):
        text = admission.request.prompt + text
    body: dict[str, Any] = {"generated_text": text}
    if params.get("details"):
        tokens = [t for m in result.messages for t in _tokens(m)]
        body["details"] = {
            "finish_reason": FINISH_REASONS[result.finish_reason],
            "generated_tokens": len(result.token_ids),
            "seed": _seed(admission),
            "prefill": [],
            "tokens": tokens,
            "top_tokens": None,
            "best_of_sequences": None,
        }
    return body


class _Events:
    """TGI's stream events for one request: one per token, the last with
    `generated_text` and `details`."""

    def __init__(self, admission: Admission, params: dict[str, Any]) -> None:
        self.admission = admission
        self.full = bool(params.get("return_full_text"))
        self.text = admission.request.prompt if self.full else ""
        self.index = 0
        self.generated = 0

    def __call__(self, message: pb.GenerateResponse) -> Iterable[dict[str, Any]]:
        tokens = _tokens(message)
        self.text += message.text
        self.generated += len(message.token_ids)
        for position, token in enumerate(tokens):
            self.index += 1
            last = bool(message.finish_reason) and position == len(tokens) - 1
            yield {
                "index": self.index,
                "token": token,
                "top_tokens": None,
                "generated_text": self.text if last else None,
                "details": {
                    "finish_reason": FINISH_REASONS[FINISH_NAMES[message.finish_reason]],
                    "generated_tokens": self.generated,
                    "seed": _seed(self.admission),
                    "input_length": message.prompt_tokens,
                }
                if last
                else None,
            }


def _error_event(error: GatewayError) -> dict[str, str]:
    return tgi_error(error)[1]


def add_tgi_routes(app: web.Application, service: GatewayService) -> None:
    async def run(request: web.Request, stream: bool | None) -> web.StreamResponse:
        started = time.monotonic()
        body = await http_io.read_json(request)
        admission, params = parse_request(body, request.headers.get(RATIO_HEADER))
        streaming = bool(body.get("stream")) if stream is None else stream
        upstream = await service.open(admission, "tgi", started)
        if streaming:
            return await http_io.relay(request, upstream, _Events(admission, params), _error_event)
        headers = http_io.upstream_headers(upstream)
        response = _response(admission, params, await http_io.collect(upstream))
        # The compat route answers a list of one, as TGI does.
        return web.json_response([response] if stream is None else response, headers=headers)

    async def generate(request: web.Request) -> web.StreamResponse:
        return await run(request, False)

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        return await run(request, True)

    async def compat(request: web.Request) -> web.StreamResponse:
        return await run(request, None)

    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat)
