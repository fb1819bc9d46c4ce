"""The gateway's TGI API through TGI's own Python client, `text-generation`
0.7.0 (`Client` and `AsyncClient`), against real worker processes over
real sockets, adapters from a real Valkey.

The client runs in its own virtual environment (`.tools/tgi-client`, which
scripts/setup makes: its huggingface-hub pin below 1.0 clashes with
transformers 5), as a subprocess running tests/gateway/tgi_driver.py; this
test reads what the client saw."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import ADAPTER, GATEWAY_TOKEN, Fleet

pytest_plugins = ["serving_fixtures", "gateway_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PYTHON = ROOT / ".tools" / "tgi-client" / "bin" / "python"
DRIVER = Path(__file__).with_name("tgi_driver.py")


@pytest.fixture(scope="module")
def seen(fleet: Fleet) -> dict[str, Any]:
    """What the client reported for every scenario of the driver."""
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON} is missing: run `bash scripts/setup`, which makes it")
    run = subprocess.run(
        [str(CLIENT_PYTHON), str(DRIVER), fleet.url, GATEWAY_TOKEN, f"{ADAPTER}:code"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def ok(seen: dict[str, Any], scenario: str) -> Any:
    result = seen[scenario]
    assert "ok" in result, (scenario, result)
    return result["ok"]


def test_generate_and_generate_stream_agree(seen: dict[str, Any]) -> None:
    whole, streamed = ok(seen, "generate"), ok(seen, "stream")
    assert whole["finish"] == "length" and whole["generated_tokens"] == 6
    assert "".join(whole["token_texts"]) == whole["text"] != ""
    # The streamed tokens join into generated_text, sent only on the last event.
    assert streamed["joined"] == streamed["generated_text"] == whole["text"]
    assert streamed["finish"] == "length" and streamed["generated_tokens"] == 6
    assert not any(streamed["early_texts"])


def test_sampling_with_a_seed_repeats(seen: dict[str, Any]) -> None:
    assert ok(seen, "sampled")["text"] == ok(seen, "sampled_again")["text"]


def test_finish_reasons_and_full_text(seen: dict[str, Any]) -> None:
    stop, text = seen["stop_text"], ok(seen, "generate")["text"]
    assert stop and stop in text
    for scenario, key in (("stop", "text"), ("stream_stop", "generated_text")):
        cut = ok(seen, scenario)
        assert cut["finish"] == "stop_sequence"
        assert text.startswith(cut[key]) and stop not in cut[key]
    assert ok(seen, "full_text")["text"].startswith("abc")


def test_adapter_id_names_a_set_and_task(seen: dict[str, Any]) -> None:
    tuned, streamed = ok(seen, "adapter"), ok(seen, "adapter_stream")
    assert tuned["finish"] == "length" and streamed["joined"] == tuned["text"]
    assert tuned["text"] != ok(seen, "generate")["text"]  # the task's head changed it


@pytest.mark.parametrize(
    ("scenario", "error", "words"),
    [
        ("unknown_task", "ValidationError", "no-such-task"),
        ("unknown_set", "NotFoundError", "no-such-set"),
        ("bad_floor", "ValidationError", "max_perplexity_ratio"),
        ("best_of", "ValidationError", "best_of"),
        ("truncate", "ValidationError", "truncate"),
        ("too_many_stops", "ValidationError", "at most 16"),
        ("unauthorized", "UnknownError", "bearer token"),
    ],
)
def test_refusals_are_the_clients_error_classes(
    seen: dict[str, Any], scenario: str, error: str, words: str
) -> None:
    assert seen[scenario].get("error") == error, seen[scenario]
    assert words in seen[scenario]["message"]


def test_the_async_client(seen: dict[str, Any]) -> None:
    result = ok(seen, "async")
    assert result["text"] == result["joined"] == ok(seen, "generate")["text"]
