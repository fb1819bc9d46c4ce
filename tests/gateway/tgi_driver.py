"""Drives the gateway's TGI API with TGI's own Python client,
`text-generation` 0.7.0, and prints what it saw as JSON.

Run by tests/gateway/test_tgi_client.py with the client's own virtual
environment (its huggingface-hub pin below 1.0 clashes with ours):

    python tgi_driver.py URL TOKEN ADAPTER_ID

The client predates TGI's `adapter_id` (and knows nothing of the gateway's
`max_perplexity_ratio`), so the driver adds both fields to the client's own
`Parameters` model (and its `Request`, to serialize them); the client
builds, sends and parses everything else.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from text_generation import AsyncClient, Client, client, types

EXTRA: dict[str, Any] = {}


class Parameters(types.Parameters):  # type: ignore[misc]
    adapter_id: str | None = None
    max_perplexity_ratio: float | None = None


class Request(types.Request):  # type: ignore[misc]
    # Pydantic serializes a field by its declared type: declare the subclass.
    parameters: Parameters | None = None


def _parameters(**values: Any) -> Parameters:
    return Parameters(**values, **EXTRA)


client.Parameters = _parameters
client.Request = Request


def attempt(run: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": run()}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


def with_extra(extra: dict[str, Any], run: Callable[[], Any]) -> dict[str, Any]:
    EXTRA.clear()
    EXTRA.update(extra)
    try:
        return attempt(run)
    finally:
        EXTRA.clear()


def main(url: str, token: str, adapter_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    tgi = Client(url, headers=headers, timeout=60)
    report: dict[str, Any] = {}

    def generate(**kwargs: Any) -> dict[str, Any]:
        response = tgi.generate("abc", **kwargs)
        return {
            "text": response.generated_text,
            "finish": response.details.finish_reason.value,
            "generated_tokens": response.details.generated_tokens,
            "token_texts": [t.text for t in response.details.tokens],
        }

    def stream(**kwargs: Any) -> dict[str, Any]:
        events = list(tgi.generate_stream("abc", **kwargs))
        last = events[-1]
        return {
            "joined": "".join(e.token.text for e in events if not e.token.special),
            "generated_text": last.generated_text,
            "finish": last.details.finish_reason.value if last.details else None,
            "early_texts": [e.generated_text for e in events[:-1]],
            "generated_tokens": last.details.generated_tokens if last.details else None,
        }

    report["generate"] = attempt(lambda: generate(max_new_tokens=6))
    report["stream"] = attempt(lambda: stream(max_new_tokens=6))
    report["sampled"] = attempt(
        lambda: generate(max_new_tokens=6, do_sample=True, temperature=0.8, seed=7)
    )
    report["sampled_again"] = attempt(
        lambda: generate(max_new_tokens=6, do_sample=True, temperature=0.8, seed=7)
    )
    text = report["generate"].get("ok", {}).get("text", "")
    stop = text[2:4]
    report["stop_text"] = stop
    report["stop"] = attempt(lambda: generate(max_new_tokens=6, stop_sequences=[stop]))
    report["stream_stop"] = attempt(lambda: stream(max_new_tokens=6, stop_sequences=[stop]))
    report["full_text"] = attempt(lambda: generate(max_new_tokens=3, return_full_text=True))
    report["adapter"] = with_extra({"adapter_id": adapter_id}, lambda: generate(max_new_tokens=6))
    report["adapter_stream"] = with_extra(
        {"adapter_id": adapter_id}, lambda: stream(max_new_tokens=6)
    )
    task_missing = adapter_id.split(":")[0] + ":no-such-task"
    report["unknown_task"] = with_extra({"adapter_id": task_missing}, lambda: generate())
    report["unknown_set"] = with_extra({"adapter_id": "no-such-set:qa"}, lambda: generate())
    report["bad_floor"] = with_extra({"max_perplexity_ratio": 0.5}, lambda: generate())
    report["best_of"] = attempt(lambda: generate(best_of=2, do_sample=True))
    report["truncate"] = attempt(lambda: generate(truncate=4))
    report["too_many_stops"] = attempt(
        lambda: generate(stop_sequences=[f"s{i}" for i in range(17)])
    )
    stranger = Client(url, headers={"Authorization": "Bearer wrong"}, timeout=60)
    report["unauthorized"] = attempt(lambda: stranger.generate("abc"))

    async def asynchronous() -> dict[str, Any]:
        tgi_async = AsyncClient(url, headers=headers, timeout=60)
        whole = await tgi_async.generate("abc", max_new_tokens=6)
        joined = ""
        async for event in tgi_async.generate_stream("abc", max_new_tokens=6):
            joined += "" if event.token.special else event.token.text
        return {"text": whole.generated_text, "joined": joined}

    report["async"] = attempt(lambda: asyncio.run(asynchronous()))
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
