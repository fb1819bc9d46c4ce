"""OpenAI's HTTP API: /v1/completions and /v1/chat/completions (streamed
as server-sent events ending in `data: [DONE]`, or whole) and /v1/models.

`model` is the fleet's base model, or an adapter task as
`<adapterset>:<task>` (or a served set's name, for its router mixture):
/v1/models lists the base model and every task some worker serves. The
quality floor is the body's `max_perplexity_ratio` (OpenAI's clients send
it with `extra_body`) or the X-Max-Perplexity-Ratio header. One choice per
request (`n` 1); what a worker cannot do (logprobs, penalties, suffix,
logit_bias) is refused, never ignored. Chat messages are rendered in the
model's ChatML template (SmolLM2's; `chat_prompt` in
worker/model/generation.py is its one-user-message case), with the
worker's default system prompt when the request gives none.

Errors are OpenAI's error object, `{"error": {"message", "type", "param",
"code"}}`: 400 invalid_request_error, 401 invalid_api_key, 404
model_not_found, 429 rate_limit_exceeded (with Retry-After), 503 and 500
server_error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from elasticfleet.gateway import http_io
from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.routing import AdapterRef
from elasticfleet.gateway.service import RATIO_HEADER, Admission, GatewayService
from elasticfleet.worker.serving.client import FINISH_NAMES, generate_request
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant")
MAX_STOP = 4
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ERRORS = {
    Kind.INVALID: (400, "invalid_request_error", None),
    Kind.UNAUTHORIZED: (401, "invalid_request_error", "invalid_api_key"),
    Kind.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    Kind.OVERLOADED: (429, "requests", "rate_limit_exceeded"),
    Kind.UNAVAILABLE: (503, "server_error", None),
    Kind.GENERATION: (500, "server_error", None),
}
# name -> values that mean "off".
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
}


def openai_error(error: GatewayError) -> tuple[int, dict[str, Any]]:
    status, kind, code = ERRORS[error.kind]
    return status, {"error": {"message": error.message, "type": kind, "param": None, "code": code}}


def render_chat(messages: object) -> str:
    """ChatML for OpenAI chat messages, ending with the assistant's turn."""
    if not isinstance(messages, list) or not messages:
        raise http_io.invalid("`messages` must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise http_io.invalid(f"each message needs a role among {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise http_io.invalid("only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise http_io.invalid("each message's `content` must be a string or text parts")
        turns.append((role, content))
    if turns[0][0] != "system":
        turns.insert(0, ("system", DEFAULT_SYSTEM_PROMPT))
    rendered = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return rendered + "<|im_start|>assistant\n"


class ChatOrCompletion:
    """One parsed request of either endpoint."""

    def __init__(
        self, service: GatewayService, body: dict[str, Any], chat: bool, header: str | None
    ) -> None:
        http_io.refuse_unsupported(body, UNSUPPORTED)
        self.chat = chat
        self.model = self._model(service, body.get("model"))
        if chat:
            prompt = render_chat(body.get("messages"))
            limit = body.get("max_completion_tokens", body.get("max_tokens"))
            body = {**body, "max_tokens": limit}
        else:
            given = body.get("prompt")
            if isinstance(given, list) and len(given) == 1:
                given = given[0]
            if not isinstance(given, str) or not given:
                raise http_io.invalid(
                    "`prompt` must be a non-empty string (one prompt per request)"
                )
            prompt = given
        self.echo = "" if chat or not body.get("echo") else prompt
        max_tokens = http_io.number(body, "max_tokens", 1, 1_000_000, integer=True)
        temperature = http_io.number(body, "temperature", 0.0, 2.0)
        top_p = http_io.number(body, "top_p", 0.0, 1.0)
        seed = http_io.number(body, "seed", 0, (1 << 63) - 1, integer=True)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise http_io.invalid("`stop` must be a string or a list of strings")
        if len(stop) > MAX_STOP:
            raise http_io.invalid(f"`stop` has {len(stop)} sequences; at most {MAX_STOP}")
        options = body.get("stream_options") or {}
        self.stream = bool(body.get("stream"))
        self.include_usage = self.stream and bool(options.get("include_usage"))
        max_ratio = http_io.quality_floor(body, header)
        adapter = self.adapter
        # OpenAI's defaults: temperature 1 (sampling), 16 tokens for completions.
        request = generate_request(
            prompt,
            max_new_tokens=max_tokens or (0 if chat else 16),
            temperature=1.0 if temperature is None else temperature,
            top_p=top_p or 0.0,
            seed=seed,
            stop=stop,
            adapter=None if adapter is None else adapter.name,
            task=None if adapter is None else adapter.task,
        )
        if request.sampling.temperature and request.sampling.temperature < 1e-3:
            request.sampling.temperature = 0.0  # below the worker's floor: greedy, as meant
        self.admission = Admission(request, adapter, max_ratio)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    adapter: AdapterRef | None

    def _model(self, service: GatewayService, model: object) -> str:
        if not isinstance(model, str) or not model:
            raise http_io.invalid("`model` is required: the base model or <adapterset>:<task>")
        if model == service.model_name:
            self.adapter = None
            return model
        served = service.served_adapters()
        if ":" in model or model in served:
            try:
                self.adapter = AdapterRef.parse(model)
            except ValueError as error:
                raise http_io.invalid(str(error)) from None
            return model
        raise GatewayError(
            Kind.NOT_FOUND,
            f"the model {model!r} does not exist: use {service.model_name!r} or an adapter "
            "task as <adapterset>:<task> (GET /v1/models lists them)",
        )

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def whole(
        self, text: str, finish: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        reason = FINISH_REASONS[finish]
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.echo + text,
                "logprobs": None,
                "finish_reason": reason,
            }
        return {
            **self._envelope([choice], False),
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        reason = None if finish is None else FINISH_REASONS[finish]
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else {"content": text}
            )
            if reason is not None and not text:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {
                "index": 0,
                "text": (self.echo if first else "") + text,
                "logprobs": None,
                "finish_reason": reason,
            }
        return self._envelope([choice], True)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Chunks:
    """The stream's chunks: a role chunk first (chat), one per message with
    text, the finish reason last, then usage if asked and `[DONE]`."""

    def __init__(self, parsed: ChatOrCompletion) -> None:
        self.parsed = parsed
        self.first = True
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __call__(self, message: pb.GenerateResponse) -> Iterable[dict[str, Any]]:
        self.prompt_tokens = message.prompt_tokens
        self.completion_tokens = message.completion_tokens
        finish = FINISH_NAMES[message.finish_reason] or None
        if self.first and self.parsed.chat:
            yield self.parsed.chunk("", None, True)
            self.first = False
        if message.text:
            yield self.parsed.chunk(message.text, None, self.first)
            self.first = False
        if finish is not None:
            yield self.parsed.chunk("", finish, self.first)
            self.first = False

    def finish(self) -> Iterable[object]:
        if self.parsed.include_usage:
            yield {
                **self.parsed._envelope([], True),
                "usage": _usage(self.prompt_tokens, self.completion_tokens),
            }
        yield "[DONE]"


def _error_event(error: GatewayError) -> dict[str, Any]:
    return openai_error(error)[1]


def add_openai_routes(app: web.Application, service: GatewayService) -> None:
    async def run(request: web.Request, chat: bool) -> web.StreamResponse:
        started = time.monotonic()
        body = await http_io.read_json(request)
        parsed = ChatOrCompletion(service, body, chat, request.headers.get(RATIO_HEADER))
        upstream = await service.open(parsed.admission, "openai", started)
        if parsed.stream:
            chunks = _Chunks(parsed)
            return await http_io.relay(request, upstream, chunks, _error_event, chunks.finish)
        headers = http_io.upstream_headers(upstream)
        result = await http_io.collect(upstream)
        completion = len(result.token_ids)
        body = parsed.whole(result.text, result.finish_reason, result.prompt_tokens, completion)
        return web.json_response(body, headers=headers)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await run(request, False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await run(request, True)

    async def models(request: web.Request) -> web.Response:
        owner = "elasticfleet"
        data = [{"id": service.model_name, "object": "model", "created": 0, "owned_by": owner}]
        for name, held in service.served_adapters().items():
            ids = [f"{name}:{task}" for task in held.tasks] + ([name] if held.router else [])
            data += [{"id": i, "object": "model", "created": 0, "owned_by": owner} for i in ids]
        return web.json_response({"object": "list", "data": data})

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
