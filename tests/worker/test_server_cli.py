"""`elasticfleet worker` as a real process and `elasticfleet generate`
against a worker on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from elasticfleet.cli import main
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.process import WorkerProcess, WorkerStartError
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]


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


def test_worker_process_serves_and_drains_on_sigterm(
    served_model_dir: Path, tmp_path: Path
) -> None:
    args = [
        "--model", str(served_model_dir), "--port", "0",
        "--budget-bytes", str(2**26), "--threads", "1",
    ]  # fmt: skip
    worker = WorkerProcess.start(args, tmp_path / "worker.log")
    try:
        assert worker.address == f"127.0.0.1:{worker.port}" and worker.port > 0
        assert "budget 64 MiB" in worker.log.read_text()
        with WorkerClient(worker.address) as client:
            result = client.complete(generate_request("hi", max_new_tokens=3, ignore_eos=True))
            assert len(result.token_ids) == 3
            assert client.get_stats().model == served_model_dir.name
        assert worker.stop() == 0
        assert "draining" in worker.log.read_text()
    finally:
        worker.kill()


def test_a_worker_that_cannot_start_says_why(served_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(served_model_dir), "--simulated-device", str(tmp_path / "none.json")]
    with pytest.raises(WorkerStartError, match="exited with status 2") as raised:
        WorkerProcess.start(args, tmp_path / "worker.log")
    assert "simulated device" in str(raised.value) and "No such file" in str(raised.value)


def test_a_missing_token_file_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent"
    assert main(["generate", "--target", "127.0.0.1:1", "hi", "--token-file", str(missing)]) == 2
    assert f"--token-file {missing}: No such file or directory" in capsys.readouterr().err


def test_tls_settings_without_tls_are_refused() -> None:
    with pytest.raises(ValueError, match="root_certificates and server_name need tls=True"):
        WorkerClient("127.0.0.1:1", server_name="w.svc")
