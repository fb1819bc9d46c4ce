"""`elasticfleet worker` as a real process and `elasticfleet generate`
against a worker on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from elasticfleet.cli import main
from elasticfleet.worker.client import WorkerClient, generate_request
from elasticfleet.worker.engine import Engine
from elasticfleet.worker.generate import TOKENIZER_FILE
from elasticfleet.worker.model import ElasticLlama
from elasticfleet.worker.server import BackgroundServer, ServerOptions

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]

ELASTICFLEET = str(Path(sys.executable).with_name("elasticfleet"))


@pytest.fixture
def target(served_model_dir: Path, one_thread: None) -> Iterator[str]:
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE))
    running = BackgroundServer(Engine(model, tokenizer, budget_bytes=2**26), ServerOptions())
    yield f"127.0.0.1:{running.port}"
    running.stop()


def test_generate_streams_to_stdout(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with WorkerClient(target) as client:
        expected = client.complete(generate_request("hello", max_new_tokens=6)).text
    assert main(["generate", "--target", target, "hello", "--raw", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert re.search(r"\[\d+ tokens, finish: (length|eos), plan: initial\]", err)


def test_generate_reports_the_status_and_exits_non_zero(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--target", target, "hi", "--temperature", "-1"]) == 1
    assert "INVALID_ARGUMENT: temperature must be between 0 and 100" in capsys.readouterr().err


def test_worker_process_serves_and_drains_on_sigterm(served_model_dir: Path) -> None:
    command = [
        ELASTICFLEET, "worker", "--model", str(served_model_dir), "--port", "0",
        "--budget-bytes", str(2**26), "--threads", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+); budget 64 MiB", line)
        assert found, line
        with WorkerClient(f"127.0.0.1:{found.group(1)}") as client:
            result = client.complete(generate_request("hi", max_new_tokens=3, ignore_eos=True))
            assert len(result.token_ids) == 3
            assert client.get_stats().model == served_model_dir.name
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "draining" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
