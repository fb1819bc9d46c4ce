"""The ready file's format: what a worker writes, what a launcher accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticfleet.worker.serving.readiness import (
    ReadyFileError,
    WorkerReady,
    read_ready_file,
    remove_ready_file,
    write_ready_file,
)

READY = WorkerReady(host="127.0.0.1", port=50051, metrics_port=None, pid=4242)


def test_a_written_file_reads_back_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "w.ready.json"
    write_ready_file(path, READY)
    assert read_ready_file(path) == READY and READY.address == "127.0.0.1:50051"
    assert json.loads(path.read_text()) == {
        "host": "127.0.0.1",
        "port": 50051,
        "metrics_port": None,
        "pid": 4242,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["w.ready.json"]  # no temporary file left


def test_writing_replaces_an_older_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "w.ready.json"
    path.write_text("a stale, longer document that the new one must not keep any of")
    write_ready_file(path, WorkerReady("::1", 1, 9090, 7))
    assert read_ready_file(path) == WorkerReady("::1", 1, 9090, 7)


def test_a_missing_file_is_not_an_error_of_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_ready_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not JSON"),
        (b'{"host": "127.0.0.1", "port": 5', "is not JSON"),
        (b"\xff\xfe{}", "is not JSON"),
        (b"[1, 2]", "holds list, not an object"),
        (b'{"host": "h", "port": 1}', "lacks metrics_port, pid"),
        (b'{"host": "", "port": 1, "metrics_port": null, "pid": 1}', "host must be a non-empty"),
        (b'{"host": 7, "port": 1, "metrics_port": null, "pid": 1}', "host must be a non-empty"),
        (b'{"host": "h", "port": "1", "metrics_port": null, "pid": 1}', "port must be an integer"),
        (b'{"host": "h", "port": 0, "metrics_port": null, "pid": 1}', "port must be an integer"),
        (b'{"host": "h", "port": 65536, "metrics_port": null, "pid": 1}', "from 1 to 65535"),
        (b'{"host": "h", "port": true, "metrics_port": null, "pid": 1}', "got True"),
        (b'{"host": "h", "port": 1, "metrics_port": 1.5, "pid": 1}', "metrics_port must be"),
        (b'{"host": "h", "port": 1, "metrics_port": null, "pid": -3}', "pid must be an integer"),
    ],
)
def test_a_malformed_file_is_refused_saying_why(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "w.ready.json"
    path.write_bytes(content)
    with pytest.raises(ReadyFileError, match=message) as raised:
        read_ready_file(path)
    assert str(raised.value).startswith(f"ready file {path}")


def test_removing_a_stale_file_needs_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "w.ready.json"
    remove_ready_file(path)  # none there: nothing to do
    write_ready_file(path, READY)
    remove_ready_file(path)
    assert not path.exists()
    with pytest.raises(ReadyFileError, match=r"folder .*absent does not exist"):
        remove_ready_file(tmp_path / "absent" / "w.ready.json")
