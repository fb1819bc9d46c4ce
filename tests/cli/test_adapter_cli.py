"""`elasticfleet adapters push | list | pull | delete`, end to end against a real Valkey server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import redis
import torch
from valkey_server import TestRedisServer, free_port

from elasticfleet.cli import main
from elasticfleet.worker.adapters.format import SPEC_FILE, TENSORS_FILE
from elasticfleet.worker.adapters.weights import AdapterWeights

MakeAdapter = Callable[..., AdapterWeights]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_push_list_pull_delete(
    redis_url: str,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ELASTICFLEET_REDIS_URL", redis_url)
    make_adapter(seed=1).save(tmp_path / "v1")
    make_adapter(seed=2).save(tmp_path / "v2")

    assert run(capsys, "list") == (0, "no adapters\n", "")
    code, out, _ = run(capsys, "push", str(tmp_path / "v1"))
    assert code == 0
    assert out.startswith("pushed demo version 1: 20 parts, ")
    assert out.endswith("(current version: 1)\n")
    assert run(capsys, "push", str(tmp_path / "v2"))[1].startswith("pushed demo version 2")

    code, out, _ = run(capsys, "list")
    header, first, second = out.splitlines()
    assert header.split()[:5] == ["NAME", "VERSION", "CURRENT", "SIZE", "PARTS"]
    assert first.split()[:2] == ["demo", "1"] and "*" not in first
    assert second.split()[:3] == ["demo", "2", "*"]
    assert "tiny-llama" in second and "code,qa,defs +router" in second

    code, out, _ = run(capsys, "pull", "demo", str(tmp_path / "pulled"))
    assert (code, out.split()[:4]) == (0, ["pulled", "demo", "version", "2"])
    pulled = (tmp_path / "pulled" / TENSORS_FILE).read_bytes()
    assert pulled == (tmp_path / "v2" / TENSORS_FILE).read_bytes()
    assert run(capsys, "pull", "demo", "--version", "1", str(tmp_path / "old"))[0] == 0
    old = AdapterWeights.load(tmp_path / "old")
    assert all(torch.equal(t, make_adapter(seed=1).tensors[n]) for n, t in old.tensors.items())

    code, _, err = run(capsys, "delete", "demo", "--version", "2")
    assert code == 2
    assert "version 2 is adapter 'demo''s current version" in err
    assert run(capsys, "delete", "demo", "--version", "1")[1].startswith("deleted demo version 1")
    assert run(capsys, "delete", "demo") == (0, "deleted demo (versions 2)\n", "")
    assert run(capsys, "list")[1] == "no adapters\n"


def test_errors_name_the_problem_and_set_the_exit_code(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "pull", "ghost", str(tmp_path), "--redis-url", redis_url)
    assert (code, err.strip()) == (
        2,
        f"elasticfleet: error: adapter 'ghost' is not in Redis at {redis_url}",
    )
    code, _, err = run(capsys, "push", str(tmp_path), "--redis-url", redis_url)
    assert code == 2 and "adapter.json is missing: not an adapter directory" in err
    down = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = run(capsys, "list", "--redis-url", down)
    assert code == 75 and f"Redis at {down} is unreachable" in err
    code, _, err = run(capsys, "list", "--redis-url", redis_url, "--tls-ca", "ca.pem")
    assert code == 2 and "TLS options need a rediss:// URL" in err


def test_password_from_flag_or_environment(
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = TestRedisServer(password="cli-pw")
    server.start()
    try:
        make_adapter().save(tmp_path / "adapter")
        url = ["--redis-url", server.url]
        assert run(capsys, "push", str(tmp_path / "adapter"), *url, "--password", "cli-pw")[0] == 0
        code, _, err = run(capsys, "list", *url, "--password", "nope")
        assert code == 2 and "refused the credentials" in err
        monkeypatch.setenv("ELASTICFLEET_REDIS_PASSWORD", "cli-pw")
        code, out, _ = run(capsys, "list", *url, "--prefix", "elasticfleet:")
        assert code == 0 and out.splitlines()[1].startswith("demo")
    finally:
        server.close()


def test_tls_flags(
    tls_redis: tuple[str, Path],
    redis_url: str,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, ca = tls_redis
    make_adapter().save(tmp_path / "adapter")
    assert (
        run(capsys, "push", str(tmp_path / "adapter"), "--redis-url", url, "--tls-ca", str(ca))[0]
        == 0
    )
    code, _, err = run(capsys, "list", "--redis-url", url)
    assert code == 2 and "pass the CA that signed it (--tls-ca)" in err
    code, out, _ = run(capsys, "list", "--redis-url", url, "--tls-insecure")
    assert code == 0 and out.splitlines()[1].startswith("demo")


# -- bad input and a bad store (issue 13, item 8) -----------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / TENSORS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"),
            "adapter.safetensors: Error while deserializing header",
        ),
        (lambda d: (d / TENSORS_FILE).write_bytes(b""), "adapter.safetensors: "),
        (
            lambda d: (d / SPEC_FILE).write_text(
                (d / SPEC_FILE).read_text().replace('"num_layers": 2', '"num_layers": 10000000')
            ),
            "adapter.json: num_layers must be 1-256 and rank 1-4096, got 10000000 and 4",
        ),
        (
            lambda d: (d / SPEC_FILE).write_text('{"name": ' * 100_000),
            "adapter.json: it is ",
        ),
        (lambda d: (d / SPEC_FILE).write_bytes(b"\xff\xfe"), "adapter.json: it is not valid JSON"),
    ],
    ids=["bad-header", "empty", "ten-million-layers", "nested", "not-utf8"],
)
def test_push_of_a_malformed_adapter_is_one_line_and_exit_2(
    redis_url: str,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], object],
    message: str,
) -> None:
    directory = make_adapter().save(tmp_path / "adapter")
    damage(directory)
    started = time.perf_counter()
    code, out, err = run(capsys, "push", str(directory), "--redis-url", redis_url)
    assert time.perf_counter() - started < 2.0
    assert (code, out) == (2, "")
    assert err.startswith(f"elasticfleet: error: {directory}/") and message in err
    assert err.count("\n") == 1 and len(err) < 400
    assert run(capsys, "list", "--redis-url", redis_url)[1] == "no adapters\n"


@pytest.fixture
def pushed(
    redis_url: str, make_adapter: MakeAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> str:
    """The URL of a store holding 'demo' and 'other' (one version each), pushed by the CLI."""
    make_adapter().save(tmp_path / "demo")
    make_adapter("other", tasks=("code",), router=False).save(tmp_path / "other")
    for name in ("demo", "other"):
        assert run(capsys, "push", str(tmp_path / name), "--redis-url", redis_url)[0] == 0
    return redis_url


def test_list_reports_a_bad_manifest_alone(
    pushed: str, raw: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    raw.set("elasticfleet:adapter:demo:manifest:1", b"[" * 200_000 + b"]" * 200_000)
    code, out, err = run(capsys, "list", "--redis-url", pushed)
    assert code == 2
    header, row = out.splitlines()
    assert header.startswith("NAME") and row.split()[:3] == ["other", "1", "*"]
    assert err == (
        "elasticfleet: error: adapter 'demo' version 1's manifest is unreadable: it is nested "
        "too deeply to be one\n"
    )


def test_gc_is_a_dry_run_unless_told_to_delete(
    pushed: str, raw: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What an interrupted push of version 2 leaves: blobs, and no manifest.
    for key in cast(list[bytes], raw.keys("elasticfleet:adapter:demo:blob:1:*")):
        orphan = key.replace(b":blob:1:", b":blob:2:")
        dumped = raw.dump(key)
        assert isinstance(dumped, bytes)
        raw.restore(orphan, 0, dumped, idletime=7200)  # untouched for two hours
    url = ["--redis-url", pushed]
    code, out, _ = run(capsys, "gc", *url)
    found, dry = out.splitlines()
    assert code == 0 and found.startswith("found 20 unreferenced blobs (about ")
    assert found.endswith(" MiB) of demo version 2")
    assert dry == "dry run: nothing was deleted; run again with --delete to delete"
    assert len(raw.keys("elasticfleet:adapter:demo:blob:2:*")) == 20
    code, out, _ = run(capsys, "gc", *url, "--grace", "86400", "--delete")
    assert (code, out) == (
        0,
        "no unreferenced blobs older than 86400 s; 20 younger than 86400 s kept\n",
    )
    code, out, _ = run(capsys, "gc", *url, "--delete")
    assert code == 0 and out.startswith("deleted 20 unreferenced blobs")
    assert raw.keys("elasticfleet:adapter:demo:blob:2:*") == []
    assert run(capsys, "pull", "demo", str(tmp_path / "pulled"), *url)[0] == 0


def test_a_stalled_redis_is_exit_75_within_the_timeout(
    make_adapter: MakeAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = TestRedisServer()
    server.start()
    try:
        make_adapter().save(tmp_path / "adapter")
        url = ["--redis-url", server.url, "--timeout", "1"]
        with server.paused():
            for command in (["list"], ["push", str(tmp_path / "adapter")], ["gc"]):
                started = time.perf_counter()
                code, _, err = run(capsys, *command, *url)
                assert time.perf_counter() - started < 3 + 1 + 1  # connect + reply + retries
                assert code == 75 and "is unreachable" in err, command
        code, out, _ = run(capsys, "list", *url)
        assert (code, out) == (0, "no adapters\n")
    finally:
        server.close()
