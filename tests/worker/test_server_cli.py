"""`elasticfleet worker` as a real process and `elasticfleet generate`
against a worker on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import certificate_pairs
from tokenizers import Tokenizer

from elasticfleet.cli import build_parser, main
from elasticfleet.cli.worker_commands import _serve
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving import readiness
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.limits import MAX_THREADS
from elasticfleet.worker.serving.process import WorkerProcess, WorkerStartError
from elasticfleet.worker.serving.readiness import WorkerReady, read_ready_file
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions, WorkerServer
from elasticfleet.worker.serving.telemetry import write_simulated_device

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]


def tiny_engine(model_dir: Path) -> Engine:
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    return Engine(model, tokenizer, budget_bytes=2**26)


@pytest.fixture
def target(served_model_dir: Path, one_thread: None) -> Iterator[str]:
    running = BackgroundServer(tiny_engine(served_model_dir), ServerOptions())
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


def test_a_worker_on_a_squeezed_device_starts_with_a_plan_that_fits(
    served_model_dir: Path, tmp_path: Path
) -> None:
    """A worker restarting beside processes that took its device's memory
    starts under a smaller plan (deepest blocks dropped) within the budget
    the device leaves, instead of exiting (a crash loop the operator could
    not reach); an explicit --budget-bytes too small is still refused."""
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device = tmp_path / "device.json"
    total = 8 * 2**20
    # Half the free memory is the budget: 60% of the dense weights.
    write_simulated_device(device, total, total - int(1.2 * weights))
    args = ["--model", str(served_model_dir), "--port", "0", "--threads", "1"]
    worker = WorkerProcess.start([*args, "--simulated-device", str(device)], tmp_path / "w.log")
    try:
        assert "starting with the deepest blocks dropped" in worker.log.read_text()
        with WorkerClient(worker.address) as client:
            stats = client.get_stats()
            mask = list(stats.keep_mask)
            assert 0 < sum(mask) < len(mask)
            assert mask == sorted(mask, reverse=True)  # the deepest blocks went first
            assert stats.memory.weight_bytes <= stats.memory.budget_bytes
            result = client.complete(generate_request("hi", max_new_tokens=2, ignore_eos=True))
            assert len(result.token_ids) == 2
    finally:
        worker.kill()
    too_small = [*args, "--budget-bytes", str(weights // 2)]
    with pytest.raises(WorkerStartError, match="more than the budget"):
        WorkerProcess.start(too_small, tmp_path / "small.log")


def test_the_ready_file_names_where_the_worker_serves(
    served_model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    ready_file = log.with_suffix(".ready.json")
    write_stale_ready_file(ready_file)
    args = [
        "--model", str(served_model_dir), "--port", "0", "--metrics-port", "0",
        "--budget-bytes", str(2**26), "--threads", "1",
    ]  # fmt: skip
    worker = WorkerProcess.start(args, log)
    try:
        ready = read_ready_file(ready_file)
        assert ready == worker.ready and ready.pid == worker.process.pid
        assert ready.address == worker.address == f"127.0.0.1:{ready.port}"
        with WorkerClient(ready.address) as client:
            assert client.get_stats().model == served_model_dir.name
        assert ready.metrics_port is not None
        url = f"http://{ready.host}:{ready.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert b"elasticfleet_" in reply.read()
        assert worker.stop() == 0
        assert not ready_file.exists()  # gone once the worker stopped taking requests
    finally:
        worker.kill()


def write_stale_ready_file(path: Path) -> None:
    """What a killed worker would have left: a whole document naming a port
    and a pid that are no longer its."""
    readiness.write_ready_file(path, WorkerReady("127.0.0.1", 1, None, 1))


def test_the_ready_file_is_written_once_both_servers_listen(
    served_model_dir: Path, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_file = tmp_path / "w.ready.json"
    written: list[WorkerReady] = []
    write = readiness.write_ready_file

    def write_when_listening(path: Path, ready: WorkerReady) -> None:
        # The kernel accepts a connection only on a listening socket, even
        # while the server's own thread is busy right here.
        for port in (ready.port, ready.metrics_port):
            assert port is not None
            socket.create_connection((ready.host, port), timeout=5).close()
        write(path, ready)
        written.append(ready)
        signal.raise_signal(signal.SIGTERM)  # the worker drains and _serve returns

    monkeypatch.setattr(readiness, "write_ready_file", write_when_listening)
    server = WorkerServer(tiny_engine(served_model_dir), ServerOptions(port=0, metrics_port=0))
    serving = _serve(server, 2**26, "test device", ready_file)
    assert asyncio.run(asyncio.wait_for(serving, 60)) == 0
    assert server.metrics is not None
    assert written == [WorkerReady("127.0.0.1", server.port, server.metrics.port, os.getpid())]
    assert not ready_file.exists()  # removed when SIGTERM came


def test_a_worker_removes_a_stale_ready_file_before_anything_else(
    served_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ready_file = tmp_path / "w.ready.json"
    write_stale_ready_file(ready_file)
    args = ["worker", "--model", str(served_model_dir), "--ready-file", str(ready_file)]
    # It fails on its device, before loading the model: the stale file is gone all the same.
    assert main([*args, "--simulated-device", str(tmp_path / "none.json")]) == 2
    assert not ready_file.exists()
    nowhere = tmp_path / "absent" / "w.ready.json"
    assert main(["worker", "--ready-file", str(nowhere)]) == 2
    assert f"folder {nowhere.parent} does not exist" in capsys.readouterr().err


def test_a_worker_that_never_listens_is_killed_at_the_timeout(
    served_model_dir: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    os.mkfifo(token)  # reading the token blocks until someone writes: nobody will
    args = ["--model", str(served_model_dir), "--port", "0", "--token-file", str(token)]
    with pytest.raises(WorkerStartError, match="did not listen within 1 s"):
        WorkerProcess.start(args, tmp_path / "worker.log", timeout_s=1.0)
    leftover = processes_naming(tmp_path)
    for pid in leftover:  # a failure here must not leave a worker blocked forever
        os.kill(pid, signal.SIGKILL)
    assert leftover == []


def processes_naming(path: Path) -> list[int]:
    """The processes whose command line mentions `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # not a process, or one that just ended
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_a_missing_token_file_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent"
    assert main(["generate", "--target", "127.0.0.1:1", "hi", "--token-file", str(missing)]) == 2
    assert f"--token-file {missing}: No such file or directory" in capsys.readouterr().err


def test_tls_settings_without_tls_are_refused() -> None:
    for settings in ({"server_name": "w.svc"}, {"root_certificates": b"PEM"}):
        with pytest.raises(ValueError, match="root_certificates and server_name need tls=True"):
            WorkerClient("127.0.0.1:1", **settings)


EXAMPLE_FLEET = Path(__file__).parents[2] / "operator" / "examples" / "elasticfleet.yaml"


@pytest.mark.parametrize("content", ["", "  \n\t\n"], ids=["empty", "whitespace"])
def test_an_empty_token_file_is_refused_by_every_command_that_takes_one(
    served_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    commands = {
        "worker": ["worker", "--model", str(served_model_dir), "--port", "0"],
        "generate": ["generate", "--target", "127.0.0.1:1", "hi"],
        "operator loop": ["operator", "loop", str(EXAMPLE_FLEET), "--worker", "w=127.0.0.1:1"],
    }
    for name, args in commands.items():
        assert main([*args, "--token-file", str(token)]) == 2, name
        err = capsys.readouterr().err
        assert f"--token-file {token}: the file is empty" in err, name
        assert "authentication off" in err and err.count("\n") == 1, name


def test_tls_misconfiguration_exits_2_with_one_line(
    served_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cert, _), (_, other_key) = certificate_pairs(tmp_path)
    missing = tmp_path / "absent.pem"
    worker = ["worker", "--model", str(served_model_dir), "--port", "0"]
    for key, message in (
        (missing, "No such file or directory"),
        (other_key, "KEY_VALUES_MISMATCH"),
    ):
        assert main([*worker, "--tls-cert", str(cert), "--tls-key", str(key)]) == 2
        err = capsys.readouterr().err
        assert (
            message in err and err.startswith("elasticfleet: error: TLS") and err.count("\n") == 1
        )
    assert main(["generate", "--target", "127.0.0.1:1", "hi", "--tls-ca", str(missing)]) == 2
    assert f"TLS CA bundle {missing}: No such file or directory" in capsys.readouterr().err


def test_the_worker_serves_metrics_on_the_metrics_host(
    served_model_dir: Path, tmp_path: Path
) -> None:
    args = [
        "--model", str(served_model_dir), "--port", "0", "--metrics-port", "0",
        "--metrics-host", "127.0.0.2", "--budget-bytes", str(2**26), "--threads", "1",
    ]  # fmt: skip
    worker = WorkerProcess.start(args, tmp_path / "worker.log")
    try:
        assert worker.ready.metrics_port is not None
        assert f"metrics on 127.0.0.2:{worker.ready.metrics_port}" in worker.log.read_text()
        url = f"http://127.0.0.2:{worker.ready.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert b"elasticfleet_budget_bytes" in reply.read()
        assert worker.stop() == 0
    finally:
        worker.kill()


@pytest.mark.parametrize("threads", ["0", "1025", str(10**12), "two"])
def test_threads_beyond_what_torch_takes_are_an_argument_error(
    threads: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.set_num_threads(10**12) raised only once the worker started; the
    ElasticFleet CRD bounds spec.worker.threads by the same MAX_THREADS."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["worker", "--threads", threads])
    assert exited.value.code == 2
    assert "argument --threads" in capsys.readouterr().err
    assert build_parser().parse_args(["worker", "--threads", str(MAX_THREADS)]).threads == 1024
